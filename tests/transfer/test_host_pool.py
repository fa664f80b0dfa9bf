"""The lazily pinned host pool (issue #13 item 4) on CPU: chunk bookkeeping, the background
thread against on-demand pinning, and pinning before every copy.

This machine has no CUDA, so ``cudaHostRegister``/``cudaHostUnregister`` are replaced by a
recording fake (``Recorder``), injected through ``HostPool``'s ``register``/``unregister``
arguments; everything else (the pool's memory, the copy engine, the threads) is real. The real
CUDA calls are exercised by ``tests/gpu/test_lazy_pool.py``.
"""

from __future__ import annotations

import mmap
import threading
import time

import pytest
import torch

from tokenvm_vllm.transfer import host_pool
from tokenvm_vllm.transfer.copy_engine import TorchCopyEngine
from tokenvm_vllm.transfer.host_pool import HostPool, LazyPinner
from tokenvm_vllm.transfer.layout import KVLayout

PAGE = mmap.PAGESIZE


class Recorder:
    """Stands in for cudaHostRegister/Unregister: records every call, optionally slow or
    failing, and refuses what CUDA refuses (a page registered twice, unregistering a range
    that is not registered)."""

    def __init__(self, delay: float = 0.0, fail_at: set[int] | None = None) -> None:
        self.delay = delay
        self.fail_at = fail_at or set()
        self.lock = threading.Lock()
        self.registered: dict[int, int] = {}
        self.calls: list[tuple[str, int, int, str]] = []
        self.on_register: list[object] = []
        self.hook = None

    def register(self, address: int, nbytes: int) -> None:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            if address in self.fail_at:
                self.fail_at.discard(address)
                raise RuntimeError("cudaErrorMemoryAllocation (fake)")
            for start, size in self.registered.items():
                assert address + nbytes <= start or start + size <= address, "page pinned twice"
            if self.hook is not None:
                self.on_register.append(self.hook(address, nbytes))
            self.registered[address] = nbytes
            self.calls.append(("register", address, nbytes, threading.current_thread().name))

    def unregister(self, address: int) -> None:
        with self.lock:
            assert address in self.registered, "unregistering a range that is not registered"
            nbytes = self.registered.pop(address)
            self.calls.append(("unregister", address, nbytes, threading.current_thread().name))


def make_pool(rec: Recorder, num_slots: int = 40, slot_bytes: int = 3 * 1024,
              chunk_bytes: int = 2 * PAGE, background: bool = False) -> HostPool:
    return HostPool(num_slots, slot_bytes, pin=True, background=background,
                    chunk_bytes=chunk_bytes, register=rec.register, unregister=rec.unregister)


def test_pool_memory_is_page_aligned_and_chunks_tile_it():
    rec = Recorder()
    pool = make_pool(rec, num_slots=40, slot_bytes=3000, chunk_bytes=5000)  # rounded up to pages
    pinner = pool.pinner
    assert pinner is not None
    base = pool.buffer.data_ptr()
    assert base % PAGE == 0 and pinner.chunk_bytes % PAGE == 0 and pinner.chunk_bytes >= 5000
    assert pool.buffer.shape == (40, 3000)
    pool.ensure_pinned(range(40))
    spans = sorted((address - base, size) for address, size in rec.registered.items())
    assert spans[0][0] == 0 and sum(size for _, size in spans) == 40 * 3000
    assert all(a + s == b for (a, s), (b, _) in zip(spans, spans[1:], strict=False))
    assert len(spans) == pinner.num_chunks == -(-40 * 3000 // pinner.chunk_bytes)


def test_ensure_pins_only_the_chunks_under_the_slots_once():
    rec = Recorder()
    pool = make_pool(rec, num_slots=40, slot_bytes=3 * 1024, chunk_bytes=2 * PAGE)
    pinner = pool.pinner
    assert pinner is not None
    chunk = pinner.chunk_bytes
    slot = 5  # bytes 15360..18431: chunks 1 and 2 with 8 KiB chunks (4 KiB pages)
    expected = set(range(slot * 3072 // chunk, ((slot + 1) * 3072 - 1) // chunk + 1))
    pool.ensure_pinned([slot])
    expected.add(0)  # the first chunk always: torch's is_pinned() asks about the base address
    assert {k for k in range(pinner.num_chunks) if pinner.registered(k)} == expected
    pool.ensure_pinned([slot, slot])  # idempotent
    assert len(rec.calls) == len(expected)
    with pytest.raises(ValueError, match="outside the host pool"):
        pool.ensure_pinned([40])
    pool.close()
    assert not rec.registered  # everything registered was unregistered, once
    assert [c[0] for c in rec.calls].count("unregister") == len(expected)
    with pytest.raises(RuntimeError, match="closed"):
        pool.ensure_pinned([0])


def test_copies_pin_their_slots_before_touching_them():
    """The copy engine calls ensure_pinned before it writes or reads a slot: at the moment a
    chunk is registered, the slot the store is about to write still holds its old bytes."""
    layers = 2
    kv = {f"l{i}": torch.arange(8 * 4 * 16, dtype=torch.float32).reshape(8, 4, 16) + 1000 * i
          for i in range(layers)}
    slot_bytes = layers * 4 * 16 * 4
    layout = KVLayout.from_kv_caches(kv, 8, slot_bytes, block_dim=0)
    rec = Recorder()
    pool = make_pool(rec, num_slots=64, slot_bytes=slot_bytes, chunk_bytes=PAGE)
    engine = TorchCopyEngine(layout, kv, pool)
    target = 37
    rec.hook = lambda address, nbytes: bool(pool.buffer[target].eq(0).all())
    engine.store(1, [3], [target])
    assert rec.on_register and all(rec.on_register), "a chunk was pinned after the copy wrote it"
    assert pool.buffer[target].ne(0).any()
    pinned = {k for k in range(pool.pinner.num_chunks) if pool.pinner.registered(k)}
    start, stop = target * slot_bytes, (target + 1) * slot_bytes
    assert pinned == set(pool.pinner.chunk_range(start, stop)) | {0}
    # a load from a slot in another chunk pins that chunk before reading it
    for name in kv:
        kv[name][5].zero_()
    pool.buffer[50] = pool.buffer[target]
    engine.load(2, [5], [50])
    assert set(pool.pinner.chunk_range(50 * slot_bytes, 51 * slot_bytes)) <= {
        k for k in range(pool.pinner.num_chunks) if pool.pinner.registered(k)}
    assert all(torch.equal(kv[name][5], kv[name][3]) for name in kv)
    assert len(engine.poll()) == 2


def test_background_and_on_demand_pinning_meet_without_double_registration():
    rec = Recorder(delay=0.01)
    pool = make_pool(rec, num_slots=200, slot_bytes=1024, chunk_bytes=PAGE)  # 50 chunks
    pinner = pool.pinner
    assert pinner is not None
    pool.start_pinning()
    demanded = []
    for slot in (199, 120, 3, 150, 60):  # ahead of, and behind, the background thread
        pool.ensure_pinned([slot])
        chunk = slot * 1024 // PAGE
        assert pinner.registered(chunk), "ensure returned before its chunk was registered"
        demanded.append(chunk)
    assert pool.wait_pinned(timeout=30)
    assert pinner.error is None and pinner.pinned_seconds is not None
    starts = [c[1] for c in rec.calls if c[0] == "register"]
    assert len(starts) == len(set(starts)) == pinner.num_chunks == 50
    assert pinner.background_chunks + pinner.on_demand_chunks == 50
    assert pinner.on_demand_chunks >= 1  # chunk 49 was needed long before the thread got there
    assert any(c[3] == "tokenvm-pin" for c in rec.calls)
    pool.close()
    assert not rec.registered


def test_background_stops_at_its_limit():
    rec = Recorder()
    pool = make_pool(rec, num_slots=100, slot_bytes=1024, chunk_bytes=PAGE)
    pool.start_pinning(num_slots=30)  # 30 KiB: 8 chunks of 4 KiB
    assert pool.wait_pinned(timeout=30)
    assert pool.pinner is not None and pool.pinner.registered_chunks == -(-30 * 1024 // PAGE)
    pool.close()


def test_a_failed_registration_is_retried_by_the_next_copy_and_reported():
    rec = Recorder()
    pool = make_pool(rec, num_slots=16, slot_bytes=PAGE, chunk_bytes=PAGE)
    base = pool.buffer.data_ptr()
    rec.fail_at = {base + 3 * PAGE}
    with pytest.raises(RuntimeError, match="fake"):
        pool.ensure_pinned([3])
    assert pool.pinner is not None and not pool.pinner.registered(3)
    pool.ensure_pinned([3])  # the next copy tries again
    assert pool.pinner.registered(3)
    rec.fail_at = {base + 9 * PAGE}
    pool.start_pinning()
    assert pool.wait_pinned(timeout=30)
    assert pool.pinner.error is not None and "fake" in pool.pinner.error
    assert not pool.pinner.registered(9)
    pool.ensure_pinned([9])
    assert pool.pinner.registered(9)
    pool.close()


def test_close_waits_for_the_background_thread_and_unregisters_all():
    rec = Recorder(delay=0.02)
    pool = make_pool(rec, num_slots=400, slot_bytes=1024, chunk_bytes=PAGE)
    pool.start_pinning()
    time.sleep(0.1)
    pool.close()
    assert not rec.registered
    registered = [c for c in rec.calls if c[0] == "register"]
    assert 0 < len(registered) < 100  # stopped early, and undid what it did


def test_unpinned_pool_is_plain_memory():
    pool = HostPool(4, 1000, pin=False)
    assert pool.pinner is None and not pool.pinned
    pool.ensure_pinned([3])  # no-op
    pool.buffer[3] = 7
    assert int(pool.buffer[3].sum()) == 7000
    assert pool.wait_pinned(0)
    pool.close()


def test_pinner_rejects_ranges_outside():
    pinner = LazyPinner(0, 10 * PAGE, PAGE, lambda a, n: None, lambda a: None)
    assert list(pinner.chunk_range(0, 1)) == [0]
    assert list(pinner.chunk_range(PAGE - 1, PAGE + 1)) == [0, 1]
    with pytest.raises(ValueError, match="outside"):
        pinner.chunk_range(0, 10 * PAGE + 1)


def test_a_pool_dropped_without_close_unregisters_before_its_memory_goes():
    """CUDA keeps the registration of a freed range, so a pool that was never closed must
    unregister when it is collected; otherwise the next pool mapped at the same address fails
    to register (seen on the H200 when tests built one pool after another)."""
    import gc

    rec = Recorder()
    pool = make_pool(rec)
    pool.ensure_pinned(range(40))
    registered = dict(rec.registered)
    assert registered
    del pool
    gc.collect()
    assert rec.registered == {}
    assert sorted(a for kind, a, _, _ in rec.calls if kind == "unregister") == sorted(registered)
    again = make_pool(rec)  # may land at the same address: registering it must not collide
    again.ensure_pinned(range(40))
    again.close()
    assert rec.registered == {}


def test_background_pinning_is_paced_to_its_duty_and_close_cuts_the_pause_short():
    """Registering holds up the process's GPU work, so the thread registers at most ``duty`` of
    the time: with calls of 20 ms and duty 0.25 it idles ~60 ms after each."""
    rec = Recorder(delay=0.02)
    pinner = LazyPinner(0x10000, 6 * PAGE, PAGE, rec.register, rec.unregister, duty=0.25)
    began = time.perf_counter()
    pinner.start()
    assert pinner.wait(timeout=10) and pinner.error is None
    took = time.perf_counter() - began
    assert pinner.registered_chunks == 6
    assert took >= 6 * 0.02 / 0.25 * 0.8, f"not paced: {took:.3f} s for 6 chunks of 20 ms"
    pinner.close()
    slow = LazyPinner(0x10000, 50 * PAGE, PAGE, rec.register, rec.unregister, duty=0.001)
    slow.start()  # would idle ~20 s after its first chunk
    time.sleep(0.1)
    began = time.perf_counter()
    slow.close()
    assert time.perf_counter() - began < 2, "close waited out the pause"
    assert rec.registered == {}
    with pytest.raises(ValueError, match="duty"):
        LazyPinner(0x10000, PAGE, PAGE, rec.register, rec.unregister, duty=0)


def test_a_reserved_pool_cannot_be_pinned_eagerly():
    rec = Recorder()
    with pytest.raises(ValueError, match="lazily"):
        HostPool(4, 1000, pin=True, lazy=False, reserve=True, register=rec.register,
                 unregister=rec.unregister)
    assert rec.calls == []


def test_a_shared_pool_pinned_eagerly_registers_every_chunk_before_it_returns(tmp_path):
    """A pool shared with the remote I/O process (or the other ranks) cannot be cudaHostAlloc
    memory; ``pin_mode: eager`` then registers the whole file mapping at construction, on the
    constructing thread, instead of lazily in the background."""
    rec = Recorder()
    pool = HostPool(40, 3 * 1024, pin=True, lazy=False, chunk_bytes=2 * PAGE,
                    register=rec.register, unregister=rec.unregister,
                    shared_path=str(tmp_path / "eager.pool"))
    registered = [call for call in rec.calls if call[0] == "register"]
    assert len(registered) == pool.pinner.num_chunks
    assert sum(call[2] for call in registered) >= pool.nbytes
    assert {call[3] for call in registered} == {threading.current_thread().name}
    pool.ensure_pinned(range(40))  # a copy's check finds every slot registered already
    assert len([call for call in rec.calls if call[0] == "register"]) == len(registered)
    lazy = HostPool(40, 3 * 1024, pin=True, lazy=True, chunk_bytes=2 * PAGE, background=False,
                    register=rec.register, unregister=rec.unregister,
                    shared_path=str(tmp_path / "lazy.pool"))
    assert len([call for call in rec.calls if call[0] == "register"]) == len(registered)
    assert not lazy.wait_pinned(0)
    pool.close()
    lazy.close()


def test_an_eager_pool_registers_every_chunk_once_before_it_returns_and_logs_no_thread():
    """``pin_mode: eager`` (``lazy=False``): the pool is mapped and registered chunk by chunk
    on the constructing thread (no ``cudaHostAlloc``, which took twice as long on the H200);
    the worker's ``start_pinning`` at the first step then starts no thread and logs nothing;
    a copy's check registers nothing more; under memory pressure it gives chunks back."""
    rec = Recorder()
    pool = HostPool(40, 3 * 1024, pin=True, lazy=False, chunk_bytes=2 * PAGE,
                    register=rec.register, unregister=rec.unregister)
    registered = [call for call in rec.calls if call[0] == "register"]
    assert sorted(call[1] for call in registered) == [
        pool.pinner.address + k * pool.pinner.chunk_bytes for k in range(pool.pinner.num_chunks)]
    assert {call[3] for call in registered} == {threading.current_thread().name}
    pool.start_pinning()
    assert pool.pinner._thread is None and pool.wait_pinned(0)
    pool.ensure_pinned(range(40))
    assert len([call for call in rec.calls if call[0] == "register"]) == len(registered)
    assert pool.release(20) > 0  # registered memory can go back (cudaHostAlloc's cannot)
    assert len(rec.registered) < len(registered)
    pool.close()
    assert rec.registered == {}


def test_pause_holds_the_background_thread_between_chunks_until_resume():
    """``pin_mode: overlap`` pauses registration around vLLM's CUDA graph capture: once
    ``pause`` returns nothing is being registered and nothing starts until ``resume``; pauses
    nest; the thread then finishes every chunk."""
    rec = Recorder(delay=0.02)
    pool = HostPool(200, 3 * 1024, pin=True, background=False, chunk_bytes=2 * PAGE, duty=1.0,
                    register=rec.register, unregister=rec.unregister)  # 75 chunks, 1.5 s
    pinner = pool.pinner
    pool.start_pinning()
    deadline = time.monotonic() + 10
    while not rec.calls and time.monotonic() < deadline:
        time.sleep(0.005)
    pinner.pause()
    pinner.pause()
    assert pinner._BUSY not in pinner._state
    held = len(rec.calls)
    assert 0 < held < pinner.num_chunks
    time.sleep(0.1)
    assert len(rec.calls) == held  # nothing registered while paused
    pinner.resume()
    time.sleep(0.05)
    assert len(rec.calls) == held  # still one pause open
    pinner.resume()
    assert pool.wait_pinned(timeout=10) and pinner.registered_chunks == pinner.num_chunks
    pool.close()


def test_a_copy_is_not_held_by_a_pause():
    rec = Recorder()
    pool = make_pool(rec)
    pool.pinner.pause()
    pool.ensure_pinned([39])
    assert pool.pinner.registered(39 * 3 * 1024 // pool.pinner.chunk_bytes)
    pool.pinner.resume()
    pool.close()


# -- pin_mode overlap from the model load on: the pool adopts an early registration ------------


def test_a_pool_adopts_the_early_registration_and_its_running_thread():
    from tokenvm_vllm.transfer import host_pool

    rec = Recorder(delay=0.01)
    early = host_pool.start_early_registration(200 * 3 * 1024 + 5000, None, chunk_bytes=2 * PAGE,
                                               register=rec.register, unregister=rec.unregister)
    assert host_pool.early_registration_bytes() == early.nbytes >= 200 * 3 * 1024 + 5000
    deadline = time.monotonic() + 10
    while not rec.calls and time.monotonic() < deadline:
        time.sleep(0.005)
    # A bigger pool, or one on another device, is not covered: it stays for the right one.
    assert host_pool.take_early_registration(early.nbytes + 1, None) is None
    assert host_pool.take_early_registration(200 * 3 * 1024, 0) is None
    taken = host_pool.take_early_registration(200 * 3 * 1024, None)
    assert taken is early and host_pool.early_registration_bytes() == 0
    pool = HostPool(200, 3 * 1024, pin=True, background=False, early=taken)
    assert pool.pinner is early.pinner and pool.mode.startswith(
        "registered on a thread since the model loaded")
    assert pool.buffer.data_ptr() == early.pinner.address and pool.nbytes == 200 * 3 * 1024
    pool.start_pinning(200)  # the worker's first step: the thread runs already, nothing new
    assert early.pinner._thread is not None
    pool.buffer[199].fill_(7)  # the pool's rows are the early memory
    view = torch.frombuffer(early.memory, dtype=torch.uint8, count=pool.nbytes)
    assert int(view[199 * 3 * 1024:200 * 3 * 1024].sum()) == 7 * 3 * 1024
    assert pool.wait_pinned(timeout=20) and early.pinner.registered_chunks == (
        early.pinner.num_chunks)
    assert {name for _, _, _, name in rec.calls} == {"tokenvm-pin"}  # all on its thread
    pool.close()
    assert rec.registered == {}  # every chunk unregistered, the tail beyond the pool too


def test_an_early_registration_no_pool_fits_is_released():
    from tokenvm_vllm.transfer import host_pool

    rec = Recorder()
    early = host_pool.start_early_registration(16 * PAGE, None, chunk_bytes=2 * PAGE,
                                               register=rec.register, unregister=rec.unregister)
    assert early.pinner.wait(10) and len(rec.registered) == 8
    with pytest.raises(ValueError, match="early registration serves only"):
        HostPool(8, 2 * PAGE, pin=True, background=False, early=early, shared_path="/dev/shm/x")
    with pytest.raises(ValueError, match="early registration serves only"):
        HostPool(9, 2 * PAGE, pin=True, background=False, early=early)  # larger than it
    host_pool.discard_early_registration()
    assert rec.registered == {} and host_pool.early_registration_bytes() == 0
    host_pool.discard_early_registration()  # nothing left: a no-op


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_a_pool_registered_in_chunks_asks_for_huge_pages_and_faults_chunks_in() -> None:
    """Memory that will be registered gets MADV_HUGEPAGE (VmFlags ``hg``), early or not,
    unless ``huge_pages`` is off; a pageable pool does not (THP would make a written slot cost
    up to 2 MiB of RAM). ``populate`` faults a chunk in before the registration, which then
    only locks present pages."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as thp:
            if "[never]" in thp.read():
                pytest.skip("transparent huge pages are off on this machine")
    except FileNotFoundError:
        pytest.skip("this kernel has no transparent huge pages")
    calls: list[tuple[int, int]] = []
    pinned = HostPool(8, 2 * 2**20, pin=True, background=False,
                      register=lambda a, n: calls.append((a, n)), unregister=lambda a: None)
    pageable = HostPool(8, 2 * 2**20, pin=True, background=False, huge_pages=False,
                        register=lambda a, n: calls.append((a, n)), unregister=lambda a: None)
    early = host_pool.EarlyRegistration(8 * 2**20, None, register=lambda a, n: None,
                                        unregister=lambda a: None)
    assert "hg" in _vm_flags(pinned.buffer.data_ptr())
    assert "hg" in _vm_flags(early.pinner.address)
    assert "hg" not in _vm_flags(pageable.buffer.data_ptr())  # huge_pages: false
    assert "hg" not in _vm_flags(HostPool(8, 2 * 2**20, pin=False).buffer.data_ptr())
    early.close()
    chunk = 4 * 2**20
    memory = mmap.mmap(-1, 4 * chunk, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = torch.frombuffer(memory, dtype=torch.uint8).data_ptr()
    before = host_pool.resident_bytes()
    if not host_pool.populate(address + chunk, chunk):
        pytest.skip("MADV_POPULATE_WRITE is not supported by this kernel (< 5.14)")
    assert host_pool.resident_bytes() - before >= chunk  # that chunk, and not the other 3
    assert host_pool.resident_bytes() - before < 2 * chunk
