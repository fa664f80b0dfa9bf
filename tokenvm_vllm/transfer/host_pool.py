"""The host pool: the bytes of the host tier, in the worker process.

One ``uint8`` matrix of ``num_slots x slot_bytes``. Which slot holds which block is decided by the
scheduler (``tokenvm_vllm/tiers/host_tier.py``); this module only owns the memory.

On CUDA the pool must be page-locked for asynchronous DMA and for the ``uva`` Triton kernels, which
dereference host addresses on the GPU. The memory is mapped (anonymous ``mmap``) and registered
with CUDA (``cuMemHostRegister``, portable and mapped) in ``CHUNK_BYTES`` pieces by a
``LazyPinner``; such memory is backed by transparent huge pages and each chunk is faulted in
before it is registered (``huge_pages``, ``advise_huge_pages``: registration 15x faster, and
out of CUDA's lock). ``pin_mode: eager`` registers every chunk before the pool is returned, so
before the server answers: 6.4-11.8 s for 20 GiB on H200 hosts, where one ``cudaHostAlloc``
(what eager pinning was until 2026-12-01, and still is on a GPU that cannot use registered host
memory as is, ``_host_pointer_usable``) took 12-17 s. ``pin_mode: overlap`` (the default) builds
the pool as a lazy one and the worker runs the same registration at full speed on the pinner's
thread during vLLM's warm-up (``connector/worker.py``). ``pin_mode: lazy`` registers in the
background instead, paced (registering holds up the process's GPU work, see ``CHUNK_BYTES``), in
slot order (the worker starts the thread at the first engine step, after vLLM's CUDA graph
capture, which a register call from another thread would break). Correctness never
depends on that thread's progress: every copy engine calls ``ensure_pinned(host_slots)`` before it
queues a copy, which registers the chunks under those slots synchronously (or waits for the one
the thread is registering). ``close`` unregisters everything. On the CPU platform nothing is
pinned.

``host_bytes: "auto"`` is resolved by the scheduler (``host_slots_for``) from MemAvailable and
sent to the workers in the connector metadata; a worker reserves address space for the largest
number "auto" can give (``auto_slot_bound``), uses RAM only as slots are written, and pins only
the slots the scheduler uses.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable

import torch

from tokenvm_vllm.config import HOST_BYTES_AUTO, HOST_BYTES_AUTO_FRACTION, TokenVMConfigError

logger = logging.getLogger("vllm.tokenvm")

AUTO_RESERVE_BYTES = 2**40
"""``host_bytes: "auto"`` gives a worker at most this much (1 TiB). A worker reserves this much
address space before the scheduler has measured (``MAP_NORESERVE``: untouched pages cost neither
RAM nor commit charge), so no later measurement can exceed what it holds, even where RAM grows
after start-up (a VM whose balloon inflates as memory is used)."""
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python < 3.13 lacks the constant
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
CHUNK_BYTES = 32 * 2**20
"""Registration granule. Registering holds up the process's other GPU work for the length of
the call (the H200 serving run: 256 MiB chunks, ~0.11 s each, back to back, stalled every
request for the 9 s the pool took), so a chunk is small: ~14 ms at the 0.45 s/GiB measured, and
20 GiB is 640 calls."""
BACKGROUND_DUTY = 0.1
"""The background thread registers at most this fraction of the time (it sleeps 9x each call's
length after it): the pool is pinned 10x more slowly, and the GPU work it holds up is spread
thin instead of stopped for seconds."""
CUDA_HOST_REGISTER_PORTABLE = 1
"""cudaHostRegisterPortable: pinned for every CUDA context (tensor-parallel ranks share none,
but vLLM or a library may create a second context in the worker)."""
CUDA_HOST_REGISTER_MAPPED = 2
"""cudaHostRegisterMapped: mapped into the device address space, which the ``uva`` kernels and
layer-wise loads need (they are given the host address itself; see ``_host_pointer_usable``)."""
_CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM = 91

SHARED_FOR = {"mla_store_once": "this node's ranks",
              "remote_process": "this worker and its remote I/O process"}
"""Who shares a shared pool, by the setting that shares it (``HostPool(shared_for=...)``)."""

RegisterFn = Callable[[int, int], None]
"""``register(address, nbytes)``: page-lock a range; raises on failure."""
UnregisterFn = Callable[[int], None]
"""``unregister(address)``: undo one ``register`` call, given the address it started at."""


def num_host_slots(host_bytes: int, slot_bytes: int) -> int:
    """How many whole slots ``host_bytes`` holds; at least one is required."""
    slots = host_bytes // slot_bytes
    if slots < 1:
        raise ValueError(
            f"tokenvm: host_bytes={host_bytes} is smaller than one block of all layers "
            f"({slot_bytes} bytes)")
    return slots


def mem_available() -> tuple[int, str]:
    """Bytes of RAM available now and where the number came from (psutil's MemAvailable, a
    vLLM dependency; without psutil the kernel's free pages, which understate it)."""
    try:
        import psutil
    except ImportError:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages"
    return int(psutil.virtual_memory().available), "MemAvailable"


def total_memory() -> int:
    """Bytes of RAM on this machine (psutil, as ``mem_available``; else the kernel's count)."""
    try:
        import psutil
    except ImportError:
        import os

        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.virtual_memory().total)


def resident_bytes() -> int:
    """This process's resident set now (/proc/self/statm, second field, in pages; 0 where
    there is none)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def host_slots_for(
    host_bytes: int | str, slot_bytes: int, workers: int, available: int | None = None
) -> tuple[int, str]:
    """The number of host slots every worker gets, and a sentence saying how it was reached.

    A size: ``num_host_slots``. ``"auto"``: ``HOST_BYTES_AUTO_FRACTION`` of ``available``
    (default: MemAvailable now) shared by the ``workers`` TokenVM workers on this machine,
    rounded down to whole slots. Call it once per server, in the scheduler: the workers take
    the number from the connector metadata, so they cannot disagree with it. Raises
    ``TokenVMConfigError`` (one line) when that is less than one slot.
    """
    if host_bytes != HOST_BYTES_AUTO:
        assert isinstance(host_bytes, int)
        try:
            slots = num_host_slots(host_bytes, slot_bytes)
        except ValueError as err:
            raise TokenVMConfigError(f"{err}; raise host_bytes") from None
        return slots, f"host_bytes={host_bytes}: {slots} slots of {slot_bytes} bytes"
    source = "given"
    if available is None:
        available, source = mem_available()
    share = int(available * HOST_BYTES_AUTO_FRACTION) // max(1, workers)
    how = (f"host_bytes='auto': {HOST_BYTES_AUTO_FRACTION} x {source} {available} bytes / "
           f"{workers} worker(s) on this machine = {share} bytes per worker")
    if share > AUTO_RESERVE_BYTES:
        share = AUTO_RESERVE_BYTES
        how += f", capped at {AUTO_RESERVE_BYTES}"
    slots = share // slot_bytes
    if slots < 1:
        raise TokenVMConfigError(
            f"tokenvm: {how}, less than one block of all layers ({slot_bytes} bytes); free "
            f"memory or set host_bytes to a size (e.g. '{max(slot_bytes, 2**30) >> 20}MiB')")
    return slots, f"{how} -> {slots} slots of {slot_bytes} bytes ({slots * slot_bytes} bytes)"


def auto_slot_bound(slot_bytes: int) -> int:
    """The most slots ``host_slots_for("auto", ...)`` can give (``AUTO_RESERVE_BYTES``): what a
    worker reserves before the scheduler has measured."""
    return max(1, AUTO_RESERVE_BYTES // slot_bytes)


class LazyPinner:
    """Registers the byte range ``[address, address + nbytes)`` in ``chunk_bytes`` chunks.

    Chunk ``k`` is ``[k * chunk_bytes, (k + 1) * chunk_bytes)`` of the range (the last one
    shorter); ``address`` and ``chunk_bytes`` must be page-aligned so that no page belongs to
    two chunks (CUDA refuses to register a page twice). Every chunk is registered at most once
    (one condition variable guards the per-chunk states), whether by the background thread
    (``start``: chunks in order, up to a limit) or by ``ensure`` (the chunks under a byte range,
    synchronously: it returns only once they are registered). ``close`` stops the thread and
    unregisters every registered chunk; later ``ensure`` calls raise.
    """

    _TODO, _BUSY, _DONE = 0, 1, 2

    def __init__(
        self, address: int, nbytes: int, chunk_bytes: int, register: RegisterFn,
        unregister: UnregisterFn, name: str = "host pool", duty: float = 1.0,
    ) -> None:
        if nbytes <= 0 or chunk_bytes <= 0:
            raise ValueError(f"tokenvm: cannot pin {nbytes} bytes in chunks of {chunk_bytes}")
        self.address = address
        self.nbytes = nbytes
        self.chunk_bytes = chunk_bytes
        self.name = name
        self._register = register
        self._unregister = unregister
        if not 0 < duty <= 1:
            raise ValueError(f"tokenvm: background pinning duty {duty} must be in (0, 1]")
        self.duty = duty
        self.num_chunks = -(-nbytes // chunk_bytes)
        self._state = bytearray(self.num_chunks)
        self._cond = threading.Condition()
        self._prefix = 0
        """Chunks ``0 .. _prefix - 1`` are all registered (read without the lock: a stale value
        only sends ``ensure`` to its slow path)."""
        self._closed = False
        self._thread: threading.Thread | None = None
        self._limit = 0
        self.background_chunks = 0
        self.on_demand_chunks = 0
        self.started_at: float | None = None
        self.pinned_seconds: float | None = None
        """Seconds from ``start`` until the chunks up to its limit were all registered."""
        self.error: str | None = None
        """The background thread's failure, if it stopped on one."""
        self.done = threading.Event()
        """Set when the chunks up to ``start``'s limit are registered (or the thread stopped)."""
        self._ceiling = self.num_chunks
        """Chunks from here up were given back (``release``): registered by nobody until
        ``regrow`` raises it again."""
        self._paused = 0
        """``pause`` calls not yet ``resume``d: the background thread registers nothing."""

    def chunk_range(self, start: int, stop: int) -> range:
        """Chunks covering bytes ``[start, stop)`` of the range."""
        if not 0 <= start < stop <= self.nbytes:
            raise ValueError(f"tokenvm: bytes {start}..{stop} are outside the {self.name} "
                             f"({self.nbytes} bytes)")
        return range(start // self.chunk_bytes, (stop - 1) // self.chunk_bytes + 1)

    def registered(self, chunk: int) -> bool:
        return self._state[chunk] == self._DONE

    @property
    def registered_chunks(self) -> int:
        return sum(1 for state in self._state if state == self._DONE)

    def ensure(self, start: int, stop: int) -> None:
        """Return once every chunk under bytes ``[start, stop)`` is registered."""
        chunks = self.chunk_range(start, stop)
        if chunks.stop <= self._prefix:
            return
        for chunk in chunks:
            self._pin(chunk, background=False)

    def ensure_slots(self, slots: Iterable[int], slot_bytes: int) -> None:
        """``ensure`` for the rows ``slots`` of a ``slot_bytes``-wide matrix at ``address``."""
        rows = list(slots)
        if not rows:
            return
        chunk = self.chunk_bytes
        last = ((max(rows) + 1) * slot_bytes - 1) // chunk
        if last >= self.num_chunks or min(rows) < 0:
            raise ValueError(f"tokenvm: slots {min(rows)}..{max(rows)} are outside the "
                             f"{self.name} ({self.nbytes // slot_bytes} slots)")
        if last < self._prefix:
            return  # the common case once the background thread is past them
        needed = {k for row in rows
                  for k in range(row * slot_bytes // chunk,
                                 ((row + 1) * slot_bytes - 1) // chunk + 1)}
        for k in sorted(needed):
            if k >= self._prefix:
                self._pin(k, background=False)

    def start(self, nbytes: int | None = None) -> None:
        """Register the chunks covering the first ``nbytes`` (default: all) on a daemon thread,
        in order, skipping those ``ensure`` registered; logs when they are all registered."""
        if self._thread is not None or self._closed:
            return
        if self._prefix >= self.num_chunks:  # an eager pool, registered already: no log line
            self.done.set()
            return
        self._limit = self.num_chunks if nbytes is None else len(self.chunk_range(0, nbytes))
        self.started_at = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="tokenvm-pin", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the background pinning finished (successfully or not) within ``timeout``."""
        return self.done.wait(timeout)

    def pause(self) -> None:
        """Hold the background thread before its next chunk and return once no chunk is being
        registered by it (``pin_mode: overlap``: vLLM's CUDA graph capture, in CUDA's global
        mode, fails on a registration from another thread). Nests; ``resume`` undoes one."""
        with self._cond:
            self._paused += 1
            self._cond.wait_for(lambda: self._BUSY not in self._state)

    def resume(self) -> None:
        with self._cond:
            self._paused = max(0, self._paused - 1)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the thread (after its current chunk) and unregister every registered chunk."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            while self._BUSY in self._state:  # an ensure on another thread: let it finish
                self._cond.wait()
            done = [k for k in range(self.num_chunks) if self._state[k] == self._DONE]
            for chunk in done:
                self._state[chunk] = self._TODO
            self._prefix = 0
        for chunk in done:
            try:
                self._unregister(self.address + chunk * self.chunk_bytes)
            except Exception as err:  # shutting down: report, and unregister the rest
                logger.warning("TokenVM: unregistering %s chunk %d failed: %s",
                               self.name, chunk, err)

    def release(self, first_chunk: int) -> int:
        """Give back chunks ``first_chunk`` and up: unregister those registered (waiting for
        one being registered) and register none of them again until ``regrow``. The caller
        guarantees no copy uses them. Returns how many chunks were unregistered."""
        with self._cond:
            self._ceiling = min(self._ceiling, max(0, first_chunk))
            while self._BUSY in self._state[first_chunk:]:
                self._cond.wait()
            done = [k for k in range(first_chunk, self.num_chunks)
                    if self._state[k] == self._DONE]
            for chunk in done:
                self._state[chunk] = self._TODO
            self._prefix = min(self._prefix, first_chunk)
        for chunk in done:
            self._unregister(self.address + chunk * self.chunk_bytes)
        return len(done)

    def regrow(self, stop_chunk: int) -> None:
        """Chunks below ``stop_chunk`` may be registered again; if background pinning was
        started, a paced thread registers those of them below its limit (copies meanwhile
        register what they need, as at start-up)."""
        with self._cond:
            first = self._ceiling
            self._ceiling = max(self._ceiling, min(stop_chunk, self.num_chunks))
            if self._closed or self._thread is None or first >= min(self._limit, self._ceiling):
                return
            chunks = range(first, min(self._limit, self._ceiling))
        threading.Thread(target=self._repin, args=(chunks,), name="tokenvm-repin",
                         daemon=True).start()

    def _pin(self, chunk: int, background: bool) -> bool:
        """Register ``chunk`` unless it is (or is being) registered; returns whether this call
        registered it. Raises what ``register`` raised (the chunk stays unregistered)."""
        with self._cond:
            # (the background thread also waits out a ``pause``, in the same lock that marks
            # the chunk busy: ``pause`` returning means nothing registers until ``resume``)
            while self._state[chunk] == self._BUSY or (
                    background and self._paused and not self._closed):
                self._cond.wait()
            if self._state[chunk] == self._DONE:
                return False
            if chunk >= self._ceiling:
                if background:
                    return False
                raise RuntimeError(f"tokenvm: chunk {chunk} of the {self.name} was given back "
                                   "under memory pressure; no copy may use it until it regrows")
            if self._closed:
                if background:
                    return False
                raise RuntimeError(f"tokenvm: the {self.name} is closed")
            self._state[chunk] = self._BUSY
        start = chunk * self.chunk_bytes
        size = min(self.chunk_bytes, self.nbytes - start)
        ok = False
        try:
            self._register(self.address + start, size)
            ok = True
        finally:
            with self._cond:
                self._state[chunk] = self._DONE if ok else self._TODO
                while self._prefix < self.num_chunks and self._state[self._prefix] == self._DONE:
                    self._prefix += 1
                if ok and background:
                    self.background_chunks += 1
                elif ok:
                    self.on_demand_chunks += 1
                self._cond.notify_all()
        return True

    def _pin_paced(self, chunks: range) -> bool:
        """Register ``chunks`` in order, busy at most ``duty`` of the time (each registration is
        followed by (1/duty - 1) times its length of idle; ``close`` wakes it). False when the
        pinner was closed meanwhile."""
        for chunk in chunks:
            if self._closed:
                return False
            began = time.perf_counter()
            if self._pin(chunk, background=True) and self.duty < 1:
                idle = (time.perf_counter() - began) * (1 / self.duty - 1)
                with self._cond:
                    self._cond.wait_for(lambda: self._closed, timeout=idle)
        return not self._closed

    def _repin(self, chunks: range) -> None:
        """A regrown range, paced like start-up (no "fully pinned" bookkeeping)."""
        try:
            self._pin_paced(chunks)
        except Exception as err:
            logger.error("TokenVM: re-pinning the regrown %s stopped: %s; copies pin what "
                         "they need themselves", self.name, err)

    def _run(self) -> None:
        try:
            if not self._pin_paced(range(self._limit)):
                return
            assert self.started_at is not None
            self.pinned_seconds = time.perf_counter() - self.started_at
            pinned = min(self.nbytes, self._limit * self.chunk_bytes)
            logger.info(
                "TokenVM %s fully pinned: %.2f GiB in %d chunks in %.2f s after start-up "
                "(%d in the background, %d on demand by copies)", self.name, pinned / 2**30,
                self._limit, self.pinned_seconds, self.background_chunks,
                self.on_demand_chunks)
        except Exception as err:
            self.error = str(err)
            logger.error("TokenVM: pinning the %s in the background stopped: %s; copies pin "
                         "what they need themselves and fail if that fails too", self.name, err)
        finally:
            self.done.set()


class EarlyRegistration:
    """Host pool memory registered from the worker's model load on, while vLLM compiles
    (``pin_mode: overlap``, ``connector/early_pool.py``): ``nbytes`` of anonymous memory and a
    ``LazyPinner`` registering it at full speed on its thread. vLLM builds the connector's
    worker side only after compiling and profiling the model (``initialize_from_config``),
    and the pool's slot size is known only then; registration does not need it. The
    ``HostPool`` built then adopts this memory and this pinner (``take_early_registration``:
    the same device, at least its bytes), so the 8-13 s that 20 GiB take on an H200 overlap
    vLLM's compilation instead of its warm-up. One per process."""

    def __init__(self, nbytes: int, device_index: int | None, *,
                 chunk_bytes: int = CHUNK_BYTES, register: RegisterFn | None = None,
                 unregister: UnregisterFn | None = None, huge_pages: bool = True) -> None:
        self.nbytes = _page_round(nbytes)
        self.device_index = device_index
        self.memory = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge_pages:
            advise_huge_pages(self.memory)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        self.pinner = _pinner(address, self.nbytes, chunk_bytes, register, unregister,
                              device_index, duty=1.0)
        # Dropped without being adopted (a pool that could not use it): unregister first.
        self._finalizer = weakref.finalize(self, _unpin_then_release, self.pinner, self.memory)

    def start(self) -> None:
        self.pinner.start()

    def close(self) -> None:
        """Unregister and unmap (a registration no pool adopted)."""
        self._finalizer()


_EARLY: EarlyRegistration | None = None
"""This process's early registration until a pool adopts it (``take_early_registration``)."""


def start_early_registration(nbytes: int, device_index: int | None, *, start: bool = True,
                             chunk_bytes: int = CHUNK_BYTES, register: RegisterFn | None = None,
                             unregister: UnregisterFn | None = None,
                             huge_pages: bool = True) -> EarlyRegistration:
    """Map ``nbytes`` and start registering them on a thread (``start=False``: the caller
    calls ``start()``); replaces an earlier one."""
    global _EARLY
    discard_early_registration()
    _EARLY = EarlyRegistration(nbytes, device_index, chunk_bytes=chunk_bytes,
                               register=register, unregister=unregister,
                               huge_pages=huge_pages)
    if start:
        _EARLY.start()
    return _EARLY


def early_registration_bytes() -> int:
    """Bytes an early registration holds (page-locked already, or about to be), else 0."""
    return _EARLY.nbytes if _EARLY is not None else 0


def take_early_registration(nbytes: int, device_index: int | None) -> EarlyRegistration | None:
    """Hand the early registration to the pool being built, if it covers ``nbytes`` on
    ``device_index``; the caller owns it from then on. None otherwise (it stays until
    ``discard_early_registration``)."""
    global _EARLY
    early = _EARLY
    if early is None or early.nbytes < nbytes or early.device_index != device_index:
        return None
    _EARLY = None
    return early


def discard_early_registration() -> None:
    """Unregister and unmap an early registration no pool took (logged: its time was lost)."""
    global _EARLY
    early, _EARLY = _EARLY, None
    if early is not None:
        logger.warning("TokenVM host pool: the %.2f GiB registered since the model loaded "
                       "did not fit the pool built; released, and the pool registers its own",
                       early.nbytes / 2**30)
        early.close()


class HostPool:
    """``num_slots`` slots of ``slot_bytes`` each (``buffer``, a ``(num_slots, slot_bytes)``
    ``uint8`` tensor whose address never changes).

    ``pin=False``: plain pageable memory (the CPU platform, or ``pin_memory=false``).
    ``reserve``: the size is an upper bound (``host_bytes: "auto"``): map it ``MAP_NORESERVE``.
    ``pin=True``: page-locked for CUDA. With ``lazy`` (``pin_mode: lazy``, or a reserved pool):
    ``ensure_pinned`` before every CUDA copy, plus a background thread from ``start_pinning``
    (at once, unless ``background`` is False) registering at most ``duty`` of the time.
    ``register``/``unregister`` replace the CUDA calls (tests on machines without CUDA).
    Without ``lazy`` (``pin_mode: eager``): every chunk is registered
    before this returns (no thread; ``ensure_pinned`` then finds them done). Where the GPU
    cannot use a registered host address as a device address (``_host_pointer_usable``) the
    pool is allocated pinned instead (``torch.empty(pin_memory=True)``, ``cudaHostAlloc``),
    whatever was asked. ``pinned`` is True in every pinned mode.

    ``shared_path``: map this file (e.g. in ``/dev/shm``) ``MAP_SHARED`` instead of anonymous
    memory, so the processes that open the same path share one pool (the workers of one node,
    for MLA's replicated latent KV stored once; the remote tier's I/O process,
    ``remote_process``: ``connector/worker.py``). Registered with CUDA rather than allocated
    pinned (``cudaHostAlloc`` memory is private to the process), lazily or, with
    ``lazy=False``, before this returns, as any eager pool. The caller
    removes the file. ``create``: make the file if missing; False: another process makes it,
    wait for it (``SHARED_POOL_WAIT_S``), so a rank that cannot see the creator's file fails
    instead of serving from an empty pool. ``shared_for``: the setting that shares the pool
    (``SHARED_FOR``), named in the log and, as the thing to set false, in this pool's errors.
    ``lazily``: how the log line calls a lazy pool's pinning (the worker's ``pin_mode:
    overlap`` registers it at full speed during vLLM's warm-up, not paced). ``early``: memory
    registered since the model loaded (``EarlyRegistration``, at least this pool's bytes on
    this device): the pool is its first ``nbytes`` and its pinner the registration's, already
    running (a lazy, private, not reserved pool only).
    """

    def __init__(
        self, num_slots: int, slot_bytes: int, pin: bool, *, background: bool = True,
        chunk_bytes: int = CHUNK_BYTES, register: RegisterFn | None = None,
        unregister: UnregisterFn | None = None, device_index: int | None = None,
        reserve: bool = False, lazy: bool = True, duty: float = BACKGROUND_DUTY,
        shared_path: str | None = None, create: bool = True,
        shared_for: str = "mla_store_once", lazily: str = "pinned lazily",
        early: EarlyRegistration | None = None, huge_pages: bool = True,
    ) -> None:
        start = time.perf_counter()
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.nbytes = num_slots * slot_bytes
        self.pinned = pin
        self.pinner: LazyPinner | None = None
        self._mmap: mmap.mmap | None = None
        self._early = early  # (holds the registration, whose finalizer unregisters it)
        self.shared = shared_path is not None
        self._warned_eager = False
        if reserve and pin and not lazy:
            raise ValueError("tokenvm: a reserved (host_bytes='auto') pool can only be pinned "
                             "lazily")
        if early is not None and (not (pin and lazy) or reserve or shared_path is not None
                                  or early.nbytes < self.nbytes):
            raise ValueError("tokenvm: an early registration serves only a lazily pinned, "
                             "private, fixed-size pool no larger than it")
        # An eager pool is mapped and registered chunk by chunk right here, as a lazy one is
        # later: twice as fast as one cudaHostAlloc of the same size (20 GiB on the H200: 6.4 s
        # against 13.1 s; more threads registering side by side did not help, 6.6-8.0 s), and
        # the only way for a pool shared with another process (cudaHostAlloc memory is private).
        register_now = pin and not lazy
        lazy = pin and (lazy or register_now) and (
            register is not None or _host_pointer_usable(device_index))
        if shared_path is not None:
            if pin and not lazy:
                raise TokenVMConfigError(
                    "tokenvm: this GPU cannot use registered host memory, which a host pool "
                    f"shared with another process needs: set {shared_for}=false")
            mode = (f"shared by {SHARED_FOR[shared_for]} in {shared_path}, "
                    + (("pinned" if register_now else lazily) if lazy else "pageable"))
            self._mmap = _map_shared(shared_path, self.nbytes, reserve, create,
                                     f"{shared_for}=false")
            self.buffer = torch.frombuffer(self._mmap, dtype=torch.uint8).view(
                num_slots, slot_bytes)
        elif early is not None:
            done = early.pinner.registered_chunks
            mode = (f"registered on a thread since the model loaded (pin_mode overlap), "
                    f"{done} of {early.pinner.num_chunks} chunks so far")
            self._mmap = early.memory
            self.buffer = torch.frombuffer(self._mmap, dtype=torch.uint8,
                                           count=self.nbytes).view(num_slots, slot_bytes)
        elif pin and not lazy:
            mode = "pinned eagerly by cudaHostAlloc"
            self.buffer = torch.empty((num_slots, slot_bytes), dtype=torch.uint8, pin_memory=True)
        else:
            if register_now:
                mode = "pinned eagerly, registered in chunks"
            else:
                mode = f"pageable, {lazily}" if lazy else "pageable"
                mode += ", address space only until the scheduler's count" if reserve else (
                    ", RAM used as slots are written")
            # Anonymous mmap: page-aligned (chunks never share a page) and untouched pages cost
            # no RAM, so a slot costs memory only once a block is written to it.
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (_MAP_NORESERVE if reserve else 0)
            try:
                self._mmap = mmap.mmap(-1, self.nbytes, flags=flags)
            except OSError as err:
                what = "reserve address space for" if reserve else "allocate"
                raise TokenVMConfigError(
                    f"tokenvm: cannot {what} the host pool ({self.nbytes} bytes): {err}"
                    + ("; host_bytes='auto' needs vm.overcommit_memory 0 or 1 and no "
                       "'ulimit -v': set host_bytes to a size instead" if reserve else
                       "; lower host_bytes")) from None
            if lazy and huge_pages:  # registered in chunks: every page of a chunk is locked
                advise_huge_pages(self._mmap)
            self.buffer = torch.frombuffer(self._mmap, dtype=torch.uint8).view(
                num_slots, slot_bytes)
        if early is not None:
            self.pinner = early.pinner
        elif lazy:
            self.pinner = _pinner(self.buffer.data_ptr(), self.nbytes, chunk_bytes, register,
                                  unregister, device_index, duty)
            # A pool dropped without ``close`` must still unregister before its memory is
            # unmapped: CUDA keeps the registration of a freed range, and the next mmap placed
            # at that address then fails to register ("part or all of the requested memory
            # range is already mapped"; seen on the H200 when tests built pool after pool). The
            # finalizer holds the mmap, so the memory outlives the unregistering.
            weakref.finalize(self, _unpin_then_release, self.pinner, self._mmap)
            if register_now:
                self.pinner.ensure(0, self.nbytes)
            elif background:
                self.start_pinning()
        self.alloc_seconds = time.perf_counter() - start
        self.mode = mode
        """How the pool was allocated and is pinned, as its log line says."""
        logger.info(
            "TokenVM host pool: %d slots x %d bytes = %.2f GiB (%s) allocated in %.2f s",
            num_slots, slot_bytes, self.nbytes / 2**30, mode, self.alloc_seconds)

    @property
    def pin_chunk_bytes(self) -> int:
        """Bytes per CUDA registration when lazily pinned (0 otherwise). Each chunk is a
        registration of its own, and a DMA copy must not span two (``dma.byte_spans``)."""
        return self.pinner.chunk_bytes if self.pinner is not None else 0

    def start_pinning(self, num_slots: int | None = None) -> None:
        """Pin the first ``num_slots`` slots (default: all) in the background; no-op when the
        pool is not lazily pinned or already started."""
        if self.pinner is not None:
            self.pinner.start(None if num_slots is None else num_slots * self.slot_bytes)

    def ensure_pinned(self, host_slots: Iterable[int]) -> None:
        """Return once the chunks under ``host_slots`` are page-locked (no-op unless lazily
        pinned). Every CUDA copy to or from the pool calls this before it is queued."""
        if self.pinner is not None:
            # The first chunk too: torch's ``is_pinned()`` asks about the buffer's base address
            # (the Triton mover checks it), so the pool reads as pinned before any copy runs.
            self.pinner.ensure(0, 1)
            self.pinner.ensure_slots(host_slots, self.slot_bytes)

    def wait_pinned(self, timeout: float | None = None) -> bool:
        """Whether background pinning has finished (True at once when not lazily pinned)."""
        return self.pinner is None or self.pinner.wait(timeout)

    def release(self, first_slot: int, stop_slot: int | None = None) -> int:
        """Give the memory under slots ``first_slot`` and up back to the OS; returns the bytes
        of address range given back: from the first boundary at or above the slot's start of
        a page, or, lazily pinned, of a registration chunk (``CHUNK_BYTES`` geometry: a chunk
        that also holds a slot in use stays registered and resident). The caller (the
        scheduler's command, ``connector/worker.py``) guarantees that no copy uses those slots
        until ``regrow``.

        Registered (either pin mode): the chunks are unregistered first (pinned pages cannot
        be dropped), then dropped: ``MADV_DONTNEED`` on private memory (they read as zeros
        afterwards and cost RAM again only once written), ``MADV_REMOVE`` on a shared pool
        (frees the /dev/shm pages for every rank). A pool allocated by ``cudaHostAlloc`` (a
        GPU that cannot use registered memory) cannot give memory back: 0, and the slots are
        only left unused. ``stop_slot``: the slots in use end
        there (a reserved 'auto' pool is larger); the range above holds no RAM anyway."""
        if self._mmap is None:
            if not self._warned_eager:
                self._warned_eager = True
                logger.warning("TokenVM host pool: allocated pinned by cudaHostAlloc (this GPU "
                               "cannot use registered host memory), so memory cannot be given "
                               "back under pressure, only left unused")
            return 0
        # Registered: whole registration chunks (a registration cannot be split); else pages.
        chunk = self.pinner.chunk_bytes if self.pinner is not None else mmap.PAGESIZE
        first_chunk = -(-(first_slot * self.slot_bytes) // chunk)
        start = first_chunk * chunk
        stop = self.nbytes if stop_slot is None else min(
            self.nbytes, _page_round(stop_slot * self.slot_bytes))
        if start >= stop:
            return 0
        if self.pinner is not None:
            self.pinner.release(first_chunk)
        advice = mmap.MADV_REMOVE if self.shared else mmap.MADV_DONTNEED
        self._mmap.madvise(advice, start, stop - start)
        return stop - start

    def move(self, sources: list[int], targets: list[int]) -> None:
        """Copy slot ``sources[i]`` to ``targets[i]`` (disjoint sets: a shrink moves blocks
        from the slots it gives up into free kept ones; no copy in flight uses either)."""
        self.ensure_pinned(targets)  # a CUDA copy may read them right after
        index = torch.tensor(targets, dtype=torch.long)
        self.buffer[index] = self.buffer[torch.tensor(sources, dtype=torch.long)]

    def regrow(self, stop_slot: int) -> None:
        """Slots below ``stop_slot`` may be used again: their chunks may be registered again
        (in the background, paced, if background pinning ran; else on demand by copies).
        Their pages cost RAM again only as blocks are written."""
        if self.pinner is not None:
            self.pinner.regrow(-(-(stop_slot * self.slot_bytes) // self.pinner.chunk_bytes))

    def close(self) -> None:
        """Unregister what was pinned (the memory stays valid until the pool is dropped)."""
        if self.pinner is not None:
            self.pinner.close()


def _pinner(address: int, nbytes: int, chunk_bytes: int, register: RegisterFn | None,
            unregister: UnregisterFn | None, device_index: int | None,
            duty: float) -> LazyPinner:
    """A ``LazyPinner`` over ``[address, address + nbytes)`` in chunks of ``chunk_bytes``
    rounded up to whole pages (no page in two registrations), with the CUDA calls unless
    ``register``/``unregister`` replace them."""
    if register is None:
        register, unregister = _cuda_register(device_index)
    assert unregister is not None, "register without unregister"
    page = mmap.PAGESIZE
    return LazyPinner(address, nbytes, -(-chunk_bytes // page) * page, register, unregister,
                      duty=duty)


def advise_huge_pages(memory: mmap.mmap) -> bool:
    """Ask for transparent huge pages (``MADV_HUGEPAGE``) on private memory that will be
    registered with CUDA. Registering 2 MiB pages faulted in beforehand (``populate``) is 15x
    faster than registering 4 KiB pages the registration faults in itself: 0.022 against 0.336
    s/GiB on the H200 host of 2026-12-01 (``host_pool_bench --register-variants``, 4 GiB in 32
    MiB chunks); the faulting, 0.16 s/GiB, runs outside CUDA's lock, so vLLM's CUDA calls do
    not wait behind it. Where THP is off ("never") or unknown, a no-op that returns False."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return False
    try:
        memory.madvise(advice)
    except OSError:  # THP disabled, or a kernel without it
        return False
    return True


_libc: ctypes.CDLL | None = None


def populate(address: int, nbytes: int) -> bool:
    """Fault in (and zero) the pages of ``[address, address + nbytes)`` for writing
    (``MADV_POPULATE_WRITE``), before ``cuMemHostRegister`` locks them: done here, outside
    the driver's lock, the registration only locks pages that are present. ``address`` must be
    page-aligned. False where the kernel lacks it (before 5.14; registration then faults the
    pages itself, slower) or it failed; the GIL is released meanwhile (ctypes)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return bool(_libc.madvise(address, nbytes, _MADV_POPULATE_WRITE) == 0)


def _page_round(nbytes: int) -> int:
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


def _unpin_then_release(pinner: LazyPinner, memory: mmap.mmap | None) -> None:
    """A lazily pinned pool's finalizer: unregister (idempotent after ``close``); ``memory`` is
    only held so that the mapping outlives the registration."""
    del memory
    pinner.close()


SHARED_POOL_WAIT_S = 120.0
"""How long a rank waits for the rank that creates the shared pool (both are registering
vLLM's KV caches at that moment, one collective call of vLLM's executor)."""


def _map_shared(path: str, nbytes: int, reserve: bool, create: bool = True,
                fix: str = "mla_store_once=false") -> mmap.mmap:
    """``nbytes`` of the file ``path``, mapped ``MAP_SHARED``. Every opener sizes the file to
    ``nbytes`` (only ever growing it, so concurrent openers agree and no written byte is lost).
    The file is sparse: a page costs RAM once written. Unless ``reserve`` (an upper bound, see
    ``AUTO_RESERVE_BYTES``) the file system must have room for all of it: a tmpfs that runs
    out would kill the worker with SIGBUS on a write instead."""
    directory = os.path.dirname(path) or "."
    if not reserve:
        stat = os.statvfs(directory)
        free = stat.f_bavail * stat.f_frsize
        try:
            free += os.stat(path).st_size  # another rank created it already
        except FileNotFoundError:
            pass
        if free < nbytes:
            raise TokenVMConfigError(
                f"tokenvm: the shared host pool needs {nbytes} bytes in {directory}, which "
                f"has {free} free: lower host_bytes, enlarge {directory} (docker: --shm-size), "
                f"or set {fix}")
    flags = os.O_RDWR | (os.O_CREAT if create else 0) | getattr(os, "O_NOFOLLOW", 0)
    deadline = time.monotonic() + SHARED_POOL_WAIT_S
    try:
        while True:
            try:
                fd = os.open(path, flags, 0o600)
                break
            except FileNotFoundError:
                if create or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    except OSError as err:
        raise TokenVMConfigError(
            f"tokenvm: cannot open the shared host pool {path}: {err}; "
            f"set {fix}") from None
    try:
        if os.fstat(fd).st_size < nbytes:
            os.ftruncate(fd, nbytes)
        return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | (_MAP_NORESERVE if reserve else 0))
    except OSError as err:
        raise TokenVMConfigError(
            f"tokenvm: cannot map the shared host pool {path} ({nbytes} bytes): {err}; lower "
            f"host_bytes or set {fix}") from None
    finally:
        os.close(fd)


def _cuda_register(device_index: int | None,
                   fault_in: bool = True) -> tuple[RegisterFn, UnregisterFn]:
    """``cuMemHostRegister``/``cuMemHostUnregister`` (driver API through ctypes, which releases
    the GIL during the call), in ``device_index``'s primary context whichever thread calls them;
    ``fault_in``: ``populate`` each range first (``host_pool_bench`` measures without).

    Not the runtime's ``cudaHostRegister``: a failed runtime call leaves a "last error" that
    the next kernel launch on that thread reports as its own (seen on the H200: a failed
    register surfaced as an error in an unrelated ``torch.randn``). The driver API keeps no such
    state, so a failure stays the pinner's, with its own message.
    """
    from tokenvm_vllm.elastic.vmm import driver  # (loads libcuda once; a CUDA-only path)

    device = torch.cuda.current_device() if device_index is None else device_index
    cuda = driver()
    lib = ctypes.CDLL("libcuda.so.1")
    host_register = lib.cuMemHostRegister_v2
    host_register.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    host_register.restype = ctypes.c_int
    host_unregister = lib.cuMemHostUnregister
    host_unregister.argtypes = [ctypes.c_void_p]
    host_unregister.restype = ctypes.c_int
    flags = CUDA_HOST_REGISTER_PORTABLE | CUDA_HOST_REGISTER_MAPPED  # same bits in the driver API

    def register(address: int, nbytes: int) -> None:
        cuda.ensure_context(device)  # a fresh thread (the background pinner) has no context
        if fault_in:
            populate(address, nbytes)  # (outside the driver's lock: see advise_huge_pages)
        code = host_register(address, nbytes, flags)
        if code != 0:
            name, text = cuda.error_text(code)
            raise RuntimeError(
                f"tokenvm: registering {nbytes} bytes of the host pool with CUDA failed: {name} "
                f"({text}); lower host_bytes, raise 'ulimit -l', or set pin_memory=false")

    def unregister(address: int) -> None:
        cuda.ensure_context(device)
        code = host_unregister(address)
        if code != 0:
            name, text = cuda.error_text(code)
            raise RuntimeError(f"cuMemHostUnregister: {name} ({text})")

    return register, unregister


def _host_pointer_usable(device_index: int | None) -> bool:
    """Whether kernels on the device may dereference a registered host address as is
    (CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM): the ``uva`` and layer-wise
    Triton movers are handed the host pool's own address. ``cudaHostAlloc`` memory always has
    that property under UVA, registered memory only where the attribute says so (every recent
    GPU on 64-bit Linux). False when it cannot be asked: then the pool is pinned eagerly."""
    if not torch.cuda.is_available():
        return False
    torch.cuda.init()  # the driver must be initialized before it answers (cuInit)
    device = torch.cuda.current_device() if device_index is None else device_index
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        value = ctypes.c_int(0)
        result = libcuda.cuDeviceGetAttribute(
            ctypes.byref(value), _CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM,
            ctypes.c_int(device))
    except (OSError, AttributeError) as err:
        logger.warning("TokenVM: cannot ask the CUDA driver about registered host memory (%s); "
                       "pinning the host pool eagerly", err)
        return False
    if result != 0 or value.value != 1:
        logger.warning("TokenVM: GPU %d cannot use registered host memory at its host address "
                       "(cuDeviceGetAttribute -> %d, value %d); pinning the host pool eagerly",
                       device, result, value.value)
        return False
    return True
