"""Many CUDA VMM calls in one call into compiled code (``csrc/vmm_batch.c``).

Mapping a page group from Python is one ``cuMemMap`` and one ``cuMemSetAccess`` per region (64
ctypes calls for an 8B Llama on V2), creating its memory one ``cuMemCreate`` per region. Every
ctypes call gives the GIL back and takes it again: on the worker's reserve thread
(``protocol.WorkerKV``, ``background``) each hand-off is time the worker's step may wait through.
Here the loops run in C, entered once per group (maps) or once per region (creation).

Contracts:

- ``load()`` compiles ``csrc/vmm_batch.c`` with the system C compiler (``cc``) at first use,
  into ``$XDG_CACHE_HOME/tokenvm`` (default ``~/.cache/tokenvm``) under the source's hash, and
  loads it; later processes reuse the file. It returns None, having logged why once, when the
  source is not beside the package (a wheel install), there is no compiler, or the build fails:
  callers then make one ctypes call per page, as before.
- The driver functions are those of ``vmm.driver()`` (the stand-in libcuda in CPU tests), so
  both paths call the same library. The calling thread needs a current context
  (``Driver.ensure_context``), as for every VMM call.
- ``map_pages`` either maps and grants access to every page, or raises ``CudaDriverError`` naming
  the failing function with every page it mapped unmapped again; the handles stay the caller's.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from tokenvm_vllm.elastic import vmm

logger = logging.getLogger("vllm.tokenvm")

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "vmm_batch.c"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
failure = ""
"""Why ``load()`` returned None (``tokenvm doctor`` prints it); empty otherwise."""


def cache_dir() -> Path:
    """Where the compiled helper is kept: ``$XDG_CACHE_HOME/tokenvm`` or ``~/.cache/tokenvm``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenvm"


def _build() -> Path:
    """Compile the source once per version (its hash names the file); atomic for concurrent
    workers (each compiles to a temporary name and renames)."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = cache_dir() / f"libtokenvm_vmm_batch-{digest}.so"
    if target.exists():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                       check=True, capture_output=True, timeout=60)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load() -> ctypes.CDLL | None:
    """The compiled helper, or None (logged once) where it cannot be built here."""
    global _lib, _tried, failure
    with _lock:
        if _tried:
            return _lib
        _tried = True
        try:
            if not SOURCE.exists():
                raise FileNotFoundError(f"{SOURCE} not found (not a source checkout)")
            lib = ctypes.CDLL(str(_build()))
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            failure = str(err) + (f": {detail.decode(errors='replace')[:200]}" if detail else "")
            logger.info("TokenVM elastic: no compiled VMM loop (%s); mapping with one driver "
                        "call per page from Python", failure)
            return None
        size_p = ctypes.POINTER(ctypes.c_size_t)
        u64_p = ctypes.POINTER(ctypes.c_uint64)
        lib.tokenvm_map_pages.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, u64_p, u64_p, ctypes.c_size_t,
            ctypes.c_size_t, ctypes.c_int, size_p, ctypes.POINTER(ctypes.c_int)]
        lib.tokenvm_map_pages.restype = ctypes.c_int
        lib.tokenvm_create_handles.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, u64_p,
            ctypes.POINTER(ctypes.c_int)]
        lib.tokenvm_create_handles.restype = ctypes.c_size_t
        _lib = lib
        return lib


def map_pages(lib: ctypes.CDLL, addresses: Sequence[int], handles: Sequence[int],
              page_bytes: int, device: int) -> None:
    """Map ``handles[i]`` at ``addresses[i]`` (``page_bytes`` each), read-write for
    ``device``, all in one call (module docstring for the failure contract)."""
    drv = vmm.driver()
    n = len(addresses)
    addrs = (ctypes.c_uint64 * n)(*addresses)
    hands = (ctypes.c_uint64 * n)(*handles)
    failed_at, failed_call = ctypes.c_size_t(), ctypes.c_int()
    code = lib.tokenvm_map_pages(
        drv.address("cuMemMap"), drv.address("cuMemSetAccess"), drv.address("cuMemUnmap"),
        addrs, hands, n, page_bytes, device, ctypes.byref(failed_at), ctypes.byref(failed_call))
    if code != 0:
        function = ("cuMemMap", "cuMemSetAccess")[failed_call.value]
        raise vmm.CudaDriverError(f"{function} (page {failed_at.value} of {n})", code,
                                  *drv.error_text(code))


def create_handles(lib: ctypes.CDLL, device: int, page_bytes: int, count: int
                   ) -> tuple[list[int], int]:
    """Create up to ``count`` handles of ``page_bytes`` on ``device`` in one call; returns
    them and the CUresult that stopped it early (0: all created)."""
    drv = vmm.driver()
    prop = vmm.allocation_prop(device)
    out = (ctypes.c_uint64 * count)()
    code = ctypes.c_int()
    made = lib.tokenvm_create_handles(drv.address("cuMemCreate"), ctypes.byref(prop),
                                      page_bytes, count, out, ctypes.byref(code))
    return [int(out[i]) for i in range(made)], int(code.value)
