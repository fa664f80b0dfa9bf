"""Giving host memory back under memory pressure on a real GPU (issue #13 item 4): a lazily
pinned pool (real ``cuMemHostRegister``) releases its top slots (``cuMemHostUnregister`` of the
whole chunks, then ``MADV_DONTNEED``), the process's resident set falls, the chunks under the
kept slots stay registered and keep serving DMA, and after ``regrow`` the released slots are
registered again and copies to and from them are exact.

Skipped without CUDA (CI has none); ``ci/gpu/run.sh tests`` runs it on the GPU machine.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MIB = 2**20


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_release_unregisters_gives_memory_back_and_regrow_serves_dma_again(lazy):
    from tokenvm_vllm.transfer.host_pool import HostPool, resident_bytes

    device = torch.cuda.current_device()
    pool = HostPool(256, MIB, pin=True, lazy=lazy, background=False, device_index=device,
                    chunk_bytes=8 * MIB)
    pinner = pool.pinner
    assert pinner is not None, "this GPU would pin eagerly"
    pool.ensure_pinned(range(256))
    assert pinner.registered_chunks == 32
    pool.buffer.fill_(7)
    gpu = torch.empty(MIB, dtype=torch.uint8, device="cuda")
    gpu.copy_(pool.buffer[200], non_blocking=True)  # DMA from the pinned pool
    torch.cuda.synchronize()
    assert bool((gpu == 7).all())
    before = resident_bytes()
    given = pool.release(64)
    after = resident_bytes()
    assert given == 192 * MIB
    assert pinner.registered_chunks == 8  # the kept 64 MiB: 8 chunks still registered
    assert before - after > 150 * MIB, (before, after)
    assert torch.count_nonzero(pool.buffer[64:]) == 0
    gpu.copy_(pool.buffer[10], non_blocking=True)  # the kept slots still serve DMA
    torch.cuda.synchronize()
    assert bool((gpu == 7).all())
    pool.regrow(256)
    pool.ensure_pinned([200])  # what a copy engine does before queueing a copy
    assert pinner.registered(200 * MIB // pinner.chunk_bytes)
    gpu.fill_(9)
    pool.buffer[200].copy_(gpu, non_blocking=True)  # DMA into a regrown slot
    torch.cuda.synchronize()
    assert bool((pool.buffer[200] == 9).all())
    pool.close()
    assert pinner.registered_chunks == 0
