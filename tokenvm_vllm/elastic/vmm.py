"""CUDA virtual memory management (VMM) through ctypes on ``libcuda.so.1``: no build step.

The driver API splits an allocation in two: a *virtual* address range (``cuMemAddressReserve``,
costs no memory) and *physical* pages (``cuMemCreate``, memory taken from the GPU at that moment)
that are mapped into the range (``cuMemMap``) and made accessible (``cuMemSetAccess``). Unmapping
(``cuMemUnmap``) and releasing the handle (``cuMemRelease``) give the memory back while the
virtual addresses, and any tensor views over them, stay valid for later remapping. This is what
lets a KV cache tensor keep its address and shape while its physical footprint grows and shrinks.

Contracts:

- Importing this module never loads libcuda: the library is opened on first use, so the module
  imports (and its pure helpers are testable) on a machine without a GPU.
- Every driver call that returns a ``CUresult`` other than ``CUDA_SUCCESS`` raises
  ``CudaDriverError`` naming the function, the code, its name and ``cuGetErrorString`` text.
- The calls need a current CUDA context on the calling thread. ``ensure_context(device)`` makes
  the device's *primary* context (the one PyTorch's runtime uses) current when the thread has
  none; every ``VirtualRange`` method calls it, so a background mapping thread needs no setup.
- A ``VirtualRange`` must outlive every tensor viewing it: ``release()`` while a view is still
  used by a kernel is a use-after-free on the GPU (an illegal-address fault, not a Python error).
  Touching an unmapped page from a kernel faults the same way: callers (the page-group
  accounting) must only hand out blocks whose pages are mapped.

The struct layouts below follow ``cuda.h`` (CUDA 12/13, identical since 10.2): ``CUmemLocation``
is two 4-byte fields; ``CUmemAllocationProp`` is two 4-byte enums, the location (8 bytes), a
pointer (8-aligned, offset 16) and an 8-byte ``allocFlags`` struct: 32 bytes in all;
``CUmemAccessDesc`` is the location and a 4-byte flags enum: 12 bytes.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# cuda.h enums (values from the header; enums are 4-byte ints on every ABI CUDA supports).
CU_MEM_ALLOCATION_TYPE_PINNED = 0x1
CU_MEM_HANDLE_TYPE_NONE = 0x0
CU_MEM_LOCATION_TYPE_DEVICE = 0x1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0x0
CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 0x1
CUDA_ERROR_OUT_OF_MEMORY = 2  # CUresult

CUdeviceptr = ctypes.c_uint64
CUmemGenericAllocationHandle = ctypes.c_uint64

LIBCUDA = "libcuda.so.1"


class CUmemLocation(ctypes.Structure):
    """``CUmemLocation_st``: where memory lives (type DEVICE, id = device ordinal)."""

    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CUmemAllocFlags(ctypes.Structure):
    """The anonymous ``allocFlags`` struct inside ``CUmemAllocationProp_st``."""

    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class CUmemAllocationProp(ctypes.Structure):
    """``CUmemAllocationProp_st`` (32 bytes on 64-bit Linux)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", CUmemLocation),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", CUmemAllocFlags),
    ]


class CUmemAccessDesc(ctypes.Structure):
    """``CUmemAccessDesc_st`` (12 bytes)."""

    _fields_ = [("location", CUmemLocation), ("flags", ctypes.c_int)]


class CudaDriverError(RuntimeError):
    """A CUDA driver call failed; ``function`` and ``code`` say which and how."""

    def __init__(self, function: str, code: int, name: str, text: str) -> None:
        super().__init__(f"{function} failed: CUresult {code} ({name}: {text})")
        self.function = function
        self.code = code


class CudaUnavailableError(RuntimeError):
    """libcuda could not be loaded (no NVIDIA driver on this machine)."""


# name -> (argtypes); every function returns CUresult (int).
_SIGNATURES: dict[str, list[Any]] = {
    "cuInit": [ctypes.c_uint],
    "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
    "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
    "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    "cuCtxGetCurrent": [ctypes.POINTER(ctypes.c_void_p)],
    "cuCtxSetCurrent": [ctypes.c_void_p],
    "cuCtxGetDevice": [ctypes.POINTER(ctypes.c_int)],
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
    "cuMemGetAllocationGranularity": [
        ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(CUmemAllocationProp), ctypes.c_int],
    "cuMemAddressReserve": [
        ctypes.POINTER(CUdeviceptr), ctypes.c_size_t, ctypes.c_size_t, CUdeviceptr,
        ctypes.c_ulonglong],
    "cuMemAddressFree": [CUdeviceptr, ctypes.c_size_t],
    "cuMemCreate": [
        ctypes.POINTER(CUmemGenericAllocationHandle), ctypes.c_size_t,
        ctypes.POINTER(CUmemAllocationProp), ctypes.c_ulonglong],
    "cuMemRelease": [CUmemGenericAllocationHandle],
    "cuMemMap": [
        CUdeviceptr, ctypes.c_size_t, ctypes.c_size_t, CUmemGenericAllocationHandle,
        ctypes.c_ulonglong],
    "cuMemUnmap": [CUdeviceptr, ctypes.c_size_t],
    "cuMemSetAccess": [
        CUdeviceptr, ctypes.c_size_t, ctypes.POINTER(CUmemAccessDesc), ctypes.c_size_t],
    "cuMemGetInfo_v2": [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
}


class Driver:
    """The bound driver functions. Obtain it with ``driver()`` (loads libcuda once)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fns: dict[str, Callable[..., int]] = {}
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
            self._fns[name] = fn
        self._primary: dict[int, int] = {}  # device ordinal -> retained primary context
        self._lock = threading.Lock()
        self.call("cuInit", 0)

    def address(self, function: str) -> int:
        """The C address of a driver function (for compiled callers: ``vmm_batch``)."""
        fn: Any = self._fns[function]  # a ctypes function pointer (typed as its call here)
        return int(ctypes.cast(fn, ctypes.c_void_p).value or 0)

    def error_text(self, code: int) -> tuple[str, str]:
        """(name, description) of a CUresult, e.g. ('CUDA_ERROR_OUT_OF_MEMORY', 'out of memory')."""
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        # These two return CUDA_ERROR_INVALID_VALUE for unknown codes and leave the pointer NULL.
        self._fns["cuGetErrorName"](code, ctypes.byref(name))
        self._fns["cuGetErrorString"](code, ctypes.byref(text))
        return ((name.value or b"unknown").decode(), (text.value or b"unknown error").decode())

    def call(self, function: str, *args: Any) -> None:
        """Call a driver function; raise ``CudaDriverError`` unless it returns CUDA_SUCCESS."""
        code = self._fns[function](*args)
        if code != 0:
            raise CudaDriverError(function, code, *self.error_text(code))

    def ensure_context(self, device: int) -> None:
        """Make ``device``'s primary context current on this thread if no context is current.

        A thread that PyTorch already used has it; a fresh thread (a background mapper) has
        none, and every VMM call would fail with CUDA_ERROR_INVALID_CONTEXT.
        """
        current = ctypes.c_void_p()
        self.call("cuCtxGetCurrent", ctypes.byref(current))
        if current.value:
            return
        with self._lock:
            if device not in self._primary:
                dev, ctx = ctypes.c_int(), ctypes.c_void_p()
                self.call("cuDeviceGet", ctypes.byref(dev), device)
                # Retained once per process and never released: it is the same primary context
                # PyTorch holds, alive for the process's life anyway.
                self.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
                self._primary[device] = int(ctx.value or 0)
        self.call("cuCtxSetCurrent", ctypes.c_void_p(self._primary[device]))

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of the current context's device, from the driver."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
        return int(free.value), int(total.value)


_driver: Driver | None = None
_driver_lock = threading.Lock()


def driver() -> Driver:
    """The process's ``Driver``; loads ``libcuda.so.1`` on first call.

    Raises ``CudaUnavailableError`` (one line, with what to do) when there is no NVIDIA driver.
    """
    global _driver
    with _driver_lock:
        if _driver is None:
            try:
                lib = ctypes.CDLL(LIBCUDA)
            except OSError as e:
                raise CudaUnavailableError(
                    f"cannot load {LIBCUDA} ({e}): elastic KV memory needs an NVIDIA GPU and "
                    "driver; run without it on this machine") from e
            _driver = Driver(lib)
        return _driver


def allocation_prop(device: int) -> CUmemAllocationProp:
    """The allocation properties used for every page: pinned device memory, no export handle."""
    prop = CUmemAllocationProp()
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device
    return prop


def access_desc(device: int) -> CUmemAccessDesc:
    """Read-write access for ``device`` (the only device that touches its KV cache)."""
    desc = CUmemAccessDesc()
    desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = device
    desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    return desc


def granularity(device: int = 0, recommended: bool = False) -> int:
    """The page size, in bytes, that physical allocations and mappings must be multiples of
    (2 MiB on current NVIDIA GPUs)."""
    drv = driver()
    drv.ensure_context(device)
    out = ctypes.c_size_t()
    option = CU_MEM_ALLOC_GRANULARITY_RECOMMENDED if recommended else \
        CU_MEM_ALLOC_GRANULARITY_MINIMUM
    prop = allocation_prop(device)
    drv.call("cuMemGetAllocationGranularity", ctypes.byref(out), ctypes.byref(prop), option)
    return int(out.value)


# The single-operation primitives: VirtualRange composes them; vmm_bench times each one.

def create_handle(device: int, nbytes: int) -> int:
    """``cuMemCreate``: take ``nbytes`` of physical memory on ``device``; returns the handle."""
    drv = driver()
    handle = CUmemGenericAllocationHandle()
    prop = allocation_prop(device)
    drv.call("cuMemCreate", ctypes.byref(handle), nbytes, ctypes.byref(prop), 0)
    return int(handle.value)


def release_handle(handle: int) -> None:
    """``cuMemRelease``: the memory goes back to the GPU once no mapping uses it."""
    driver().call("cuMemRelease", CUmemGenericAllocationHandle(handle))


def map_handle(address: int, nbytes: int, handle: int) -> None:
    """``cuMemMap`` the whole of ``handle`` at ``address`` (offset into the handle: 0, the
    only value the driver accepts)."""
    driver().call("cuMemMap", CUdeviceptr(address), nbytes, 0,
                  CUmemGenericAllocationHandle(handle), 0)


def set_access(address: int, nbytes: int, device: int) -> None:
    """``cuMemSetAccess``: read-write for ``device`` over mapped ``[address, address+nbytes)``."""
    desc = access_desc(device)
    driver().call("cuMemSetAccess", CUdeviceptr(address), nbytes, ctypes.byref(desc), 1)


def unmap(address: int, nbytes: int) -> None:
    """``cuMemUnmap``: the addresses stay reserved; touching them from a kernel now faults."""
    driver().call("cuMemUnmap", CUdeviceptr(address), nbytes)


def tensor_view(address: int, nbytes: int, dtype: torch.dtype, shape: Sequence[int],
                device: torch.device) -> torch.Tensor:
    """A contiguous tensor of ``dtype`` and ``shape`` over ``[address, address+nbytes)``, owning
    nothing (the caller keeps the memory alive).

    Uses ``torch._C._construct_storage_from_data_pointer``, which takes the device explicitly:
    the ``__cuda_array_interface__`` route asks the runtime which device a pointer is on, and
    that query fails for a range whose first page is not mapped. Works for CPU pointers too
    (the CPU tests use that).
    """
    import torch

    numel = 1
    for s in shape:
        numel *= int(s)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize > nbytes:
        raise ValueError(
            f"tensor_view: shape {tuple(shape)} of {dtype} needs {numel * itemsize} bytes, "
            f"the range has {nbytes}; pass a smaller shape")
    storage = torch._C._construct_storage_from_data_pointer(address, device, nbytes)
    out = torch.empty((0,), dtype=dtype, device=device)
    strides: list[int] = []
    acc = 1
    for s in reversed(list(shape)):
        strides.append(acc)
        acc *= int(s)
    out.set_(storage, 0, tuple(int(s) for s in shape), tuple(reversed(strides)))
    return out


class VirtualRange:
    """A reserved virtual range of ``num_pages`` pages of ``page_bytes`` on one GPU, whose pages
    are mapped and unmapped one at a time (or in lists).

    ``size_bytes`` is rounded up to whole pages. ``page_bytes`` defaults to the device's minimum
    granularity (2 MiB) and must be a multiple of it. Pages start unmapped; ``map(i)`` creates
    physical memory for page i (or reuses a handle kept by ``unmap(i, keep_handle=True)``), maps
    it and grants read-write access. Not thread-safe for concurrent mutation of the same page, but
    method calls are serialised by a lock so one mapping thread and one reader are fine.
    Use as a context manager or call ``release()``; see the module docstring for lifetimes.
    """

    def __init__(self, size_bytes: int, device: int = 0, page_bytes: int | None = None) -> None:
        if size_bytes <= 0:
            raise ValueError(f"VirtualRange: size_bytes={size_bytes} must be > 0")
        self.device = device
        drv = driver()
        drv.ensure_context(device)
        gran = granularity(device)
        page = gran if page_bytes is None else page_bytes
        if page <= 0 or page % gran:
            raise ValueError(
                f"VirtualRange: page_bytes={page_bytes} is not a multiple of the device's "
                f"granularity {gran}; pass a multiple of {gran}")
        self.page_bytes = page
        self.num_pages = -(-size_bytes // page)
        self.size_bytes = self.num_pages * page
        base = CUdeviceptr()
        drv.call("cuMemAddressReserve", ctypes.byref(base), self.size_bytes, page,
                 CUdeviceptr(0), 0)
        self.base = int(base.value)
        self._handles: dict[int, int] = {}  # page -> handle mapped there
        self._spare: list[int] = []  # handles kept by unmap(keep_handle=True)
        self._lock = threading.Lock()
        self._released = False

    # -- state ---------------------------------------------------------------------------------

    def is_mapped(self, page: int) -> bool:
        return page in self._handles

    @property
    def mapped_pages(self) -> list[int]:
        return sorted(self._handles)

    @property
    def mapped_bytes(self) -> int:
        return len(self._handles) * self.page_bytes

    @property
    def held_bytes(self) -> int:
        """Physical bytes this range holds: mapped pages plus spare handles."""
        return (len(self._handles) + len(self._spare)) * self.page_bytes

    def address(self, page: int) -> int:
        self._check_page(page)
        return self.base + page * self.page_bytes

    def _check_page(self, page: int) -> None:
        if self._released:
            raise RuntimeError("VirtualRange: used after release(); create a new range")
        if not 0 <= page < self.num_pages:
            raise IndexError(f"VirtualRange: page {page} outside 0..{self.num_pages - 1}")

    # -- mapping -------------------------------------------------------------------------------

    def map(self, page: int) -> None:
        """Back ``page`` with physical memory, readable and writable by the device.

        Mapping a mapped page raises ``ValueError``. On a driver error (typically
        CUDA_ERROR_OUT_OF_MEMORY from cuMemCreate) nothing stays half-done: the page is
        unmapped and the handle released before the error propagates.
        """
        with self._lock:
            self._check_page(page)
            if page in self._handles:
                raise ValueError(f"VirtualRange.map: page {page} is already mapped")
            driver().ensure_context(self.device)
            handle = self._spare.pop() if self._spare else create_handle(
                self.device, self.page_bytes)
            addr = self.base + page * self.page_bytes
            try:
                map_handle(addr, self.page_bytes, handle)
            except CudaDriverError:
                release_handle(handle)
                raise
            try:
                set_access(addr, self.page_bytes, self.device)
            except CudaDriverError:
                unmap(addr, self.page_bytes)
                release_handle(handle)
                raise
            self._handles[page] = handle

    def unmap(self, page: int, keep_handle: bool = False) -> None:
        """Unmap ``page``; release its memory to the GPU unless ``keep_handle`` (then the next
        ``map`` reuses it and skips cuMemCreate). Unmapping an unmapped page raises ValueError.

        The caller must make sure no queued kernel still reads the page (synchronise first).
        """
        with self._lock:
            self._check_page(page)
            if page not in self._handles:
                raise ValueError(f"VirtualRange.unmap: page {page} is not mapped")
            driver().ensure_context(self.device)
            unmap(self.base + page * self.page_bytes, self.page_bytes)
            handle = self._handles.pop(page)
            if keep_handle:
                self._spare.append(handle)
            else:
                release_handle(handle)

    @property
    def spare_count(self) -> int:
        """Handles created (or kept by ``unmap``) and not mapped: the next maps use them."""
        return len(self._spare)

    def add_spares(self, count: int, compiled: Any = None) -> int:
        """Create up to ``count`` more spare handles (physical pages, unmapped); stops at the
        first CUDA_ERROR_OUT_OF_MEMORY and returns how many it created. Other driver errors
        propagate. ``compiled``: ``vmm_batch.load()``'s library, to create them in one call."""
        created = 0
        with self._lock:
            if self._released:
                raise RuntimeError("VirtualRange: used after release(); create a new range")
            driver().ensure_context(self.device)
            if compiled is not None and count > 0:
                from tokenvm_vllm.elastic import vmm_batch

                handles, code = vmm_batch.create_handles(compiled, self.device, self.page_bytes,
                                                         count)
                self._spare.extend(handles)
                if code not in (0, CUDA_ERROR_OUT_OF_MEMORY):
                    raise CudaDriverError("cuMemCreate", code, *driver().error_text(code))
                return len(handles)
            while created < count:
                try:
                    self._spare.append(create_handle(self.device, self.page_bytes))
                except CudaDriverError as err:
                    if err.code != CUDA_ERROR_OUT_OF_MEMORY:
                        raise
                    break
                created += 1
        return created

    def take_spare(self, page: int) -> tuple[int, int]:
        """For a caller that maps ``page`` itself (``vmm_batch``): its address and a spare
        handle, taken out of the reserve. Give it back with ``return_spare`` or record the
        mapping with ``adopt``."""
        with self._lock:
            self._check_page(page)
            if page in self._handles:
                raise ValueError(f"VirtualRange.take_spare: page {page} is already mapped")
            if not self._spare:
                raise ValueError("VirtualRange.take_spare: no spare handle")
            return self.base + page * self.page_bytes, self._spare.pop()

    def return_spare(self, handle: int) -> None:
        """A handle from ``take_spare`` that was not mapped after all."""
        with self._lock:
            self._spare.append(handle)

    def adopt(self, page: int, handle: int) -> None:
        """Record that ``handle`` (from ``take_spare``) is now mapped at ``page``, with access
        granted."""
        with self._lock:
            self._check_page(page)
            if page in self._handles:
                raise ValueError(f"VirtualRange.adopt: page {page} is already mapped")
            self._handles[page] = handle

    def drop_spares(self, keep: int = 0) -> None:
        """Release the spare handles beyond the first ``keep``."""
        if len(self._spare) <= keep:
            return  # the usual case (the worker trims every step): no lock, no driver call
        with self._lock:
            driver().ensure_context(self.device)
            while len(self._spare) > keep:
                release_handle(self._spare.pop())

    def release(self) -> None:
        """Unmap everything, release all memory and the address range. Idempotent."""
        with self._lock:
            if self._released:
                return
            drv = driver()
            drv.ensure_context(self.device)
            for page, handle in sorted(self._handles.items()):
                unmap(self.base + page * self.page_bytes, self.page_bytes)
                release_handle(handle)
            self._handles.clear()
            while self._spare:
                release_handle(self._spare.pop())
            drv.call("cuMemAddressFree", CUdeviceptr(self.base), self.size_bytes)
            self._released = True

    def __enter__(self) -> VirtualRange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- views ---------------------------------------------------------------------------------

    def as_tensor(self, dtype: torch.dtype, shape: Sequence[int] | None = None,
                  offset_bytes: int = 0) -> torch.Tensor:
        """A tensor over the range (from ``offset_bytes``), 1-D filling the rest when ``shape``
        is None. Valid to read or write only where pages are mapped; owns nothing."""
        import torch

        if self._released:
            raise RuntimeError("VirtualRange: used after release(); create a new range")
        if not 0 <= offset_bytes < self.size_bytes:
            raise ValueError(f"as_tensor: offset_bytes={offset_bytes} outside the range "
                             f"(0..{self.size_bytes - 1})")
        nbytes = self.size_bytes - offset_bytes
        if shape is None:
            shape = (nbytes // torch.empty((), dtype=dtype).element_size(),)
        return tensor_view(self.base + offset_bytes, nbytes, dtype, shape,
                           torch.device("cuda", self.device))
