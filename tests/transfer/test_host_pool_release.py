"""``HostPool.release`` / ``regrow`` (issue #13 item 4: host memory given back under memory
pressure): the memory under the released slots really goes back to the OS (the process's
resident set falls), registered chunks are unregistered first and not registered again until
``regrow``, and a chunk that also holds a slot still in use is kept.

Real memory, real ``madvise``; CUDA's register/unregister are the recording fake of
``test_host_pool.py`` (this machine has no GPU).
"""

from __future__ import annotations

import mmap
import os
import time

import pytest
import torch

from tests.transfer.test_host_pool import Recorder
from tokenvm_vllm.transfer.host_pool import HostPool, resident_bytes

PAGE = mmap.PAGESIZE
MIB = 2**20


def test_release_gives_the_memory_back_and_the_slots_read_zeros():
    slot_bytes = 1 * MIB
    pool = HostPool(256, slot_bytes, pin=False)  # 256 MiB, pageable (the CPU platform)
    pool.buffer.fill_(7)  # every page touched: resident
    before = resident_bytes()
    given = pool.release(64)
    after = resident_bytes()
    assert given == 192 * MIB
    assert before - after > 150 * MIB, (before, after)  # the RSS really fell
    assert torch.count_nonzero(pool.buffer[64:]) == 0  # released pages read as zeros
    assert bool((pool.buffer[:64] == 7).all())  # the slots kept are untouched
    pool.regrow(256)
    pool.buffer[100].fill_(3)  # usable again; costs RAM again only as written
    assert bool((pool.buffer[100] == 3).all())


def test_release_stops_at_the_slots_in_use():
    pool = HostPool(256, MIB, pin=False, reserve=True)  # 'auto': reserved beyond what is used
    pool.buffer[:96].fill_(1)
    assert pool.release(64, stop_slot=96) == 32 * MIB
    assert torch.count_nonzero(pool.buffer[64:96]) == 0
    assert bool((pool.buffer[:64] == 1).all())


def test_release_keeps_a_chunk_that_also_holds_a_slot_in_use():
    rec = Recorder()
    chunk = 2 * PAGE
    slot_bytes = 3 * 1024  # not a divisor of the chunk: slots straddle chunk boundaries
    pool = HostPool(40, slot_bytes, pin=True, background=False, chunk_bytes=chunk,
                    register=rec.register, unregister=rec.unregister)
    assert pool.pinner is not None
    pool.ensure_pinned(range(40))
    pool.buffer.fill_(5)
    first_chunk = -(-(20 * slot_bytes) // chunk)
    given = pool.release(20)
    assert given == pool.nbytes - first_chunk * chunk
    registered = {k for k in range(pool.pinner.num_chunks) if pool.pinner.registered(k)}
    assert registered == set(range(first_chunk))  # unregistered from the first whole chunk up
    base = pool.buffer.data_ptr()
    assert all(address < base + first_chunk * chunk for address in rec.registered)
    flat = pool.buffer.view(-1)
    assert bool((flat[:first_chunk * chunk] == 5).all())  # slot 19 and the chunk under it kept
    assert torch.count_nonzero(flat[first_chunk * chunk:]) == 0
    with pytest.raises(RuntimeError, match="given back under memory pressure"):
        pool.ensure_pinned([39])  # a copy into a released slot is a bug: refused, not pinned
    pool.regrow(40)
    pool.ensure_pinned([39])
    assert pool.pinner.registered(pool.pinner.num_chunks - 1)
    pool.close()
    assert not rec.registered  # everything registered was unregistered exactly once


def test_background_pinning_skips_released_chunks_and_regrow_repins_them():
    rec = Recorder()
    chunk = 2 * PAGE
    pool = HostPool(64, PAGE, pin=True, background=False, chunk_bytes=chunk,
                    register=rec.register, unregister=rec.unregister, duty=1.0)
    assert pool.pinner is not None
    pool.release(32)  # before the background thread starts
    pool.start_pinning(64)
    assert pool.wait_pinned(10)
    assert {k for k in range(pool.pinner.num_chunks) if pool.pinner.registered(k)} == set(
        range(16))
    pool.regrow(64)
    for _ in range(200):  # the re-pin thread is paced; wait for it
        if pool.pinner.registered_chunks == pool.pinner.num_chunks:
            break
        time.sleep(0.01)
    assert pool.pinner.registered_chunks == pool.pinner.num_chunks
    pool.close()
    assert not rec.registered


def test_shared_pool_release_frees_the_shm_pages(tmp_path):
    path = str(tmp_path / "pool")  # tmp_path may not be tmpfs: use /dev/shm where it exists
    if os.path.isdir("/dev/shm"):
        path = f"/dev/shm/tokenvm-test-{os.getpid()}.pool"
    try:
        pool = HostPool(128, MIB, pin=False, shared_path=path)
        pool.buffer.fill_(1)
        used = os.stat(path).st_blocks * 512
        given = pool.release(20)  # not pinned: from the slot's first page up
        assert given == 108 * MIB
        assert os.stat(path).st_blocks * 512 <= used - given
        assert torch.count_nonzero(pool.buffer[20:]) == 0
        assert bool((pool.buffer[:20] == 1).all())
    finally:
        os.unlink(path)


def test_move_copies_slots_for_a_shrink():
    pool = HostPool(8, PAGE, pin=False)
    for slot in range(8):
        pool.buffer[slot].fill_(slot)
    pool.move([6, 7], [1, 2])
    assert [int(pool.buffer[slot][0]) for slot in range(8)] == [0, 6, 7, 3, 4, 5, 6, 7]
