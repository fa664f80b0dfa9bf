"""CUDA VMM on a real GPU: pages mapped into a reserved range, written and read through torch
views, unmapped and remapped; physical memory following the mapping; page groups over several
ranges. Skipped without CUDA (CI has none); ``ci/gpu/run.sh`` runs ``tests/gpu`` on the GPU."""

from __future__ import annotations

import threading

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MIB = 1 << 20


@pytest.fixture
def vr():
    from tokenvm_vllm.elastic.vmm import VirtualRange

    torch.cuda.init()
    rng = VirtualRange(8 * 2 * MIB, device=torch.cuda.current_device())
    yield rng
    torch.cuda.synchronize()
    rng.release()


def page_view(rng, page: int) -> torch.Tensor:
    """Page ``page`` of the range as int32 (a slice of one view over the whole range)."""
    whole = rng.as_tensor(torch.int32)
    n = rng.page_bytes // 4
    return whole[page * n:(page + 1) * n]


def test_granularity_is_2_mib():
    from tokenvm_vllm.elastic.vmm import granularity

    assert granularity(torch.cuda.current_device()) == 2 * MIB


def test_map_write_read_unmap_remap(vr):
    assert vr.page_bytes == 2 * MIB and vr.num_pages == 8
    for p in (1, 2, 5):  # page 0 stays unmapped: the view must not need it
        vr.map(p)
    n = vr.page_bytes // 4
    for p in (1, 2, 5):
        page_view(vr, p).copy_(torch.arange(n, dtype=torch.int32, device="cuda") + p * 1000)
    torch.cuda.synchronize()
    for p in (1, 2, 5):
        got = page_view(vr, p).cpu()
        assert torch.equal(got, torch.arange(n, dtype=torch.int32) + p * 1000), p
    # unmap page 2 and give its memory back, remap: fresh memory, new data round-trips
    vr.unmap(2)
    assert vr.mapped_pages == [1, 5]
    vr.map(2)
    page_view(vr, 2).fill_(-7)
    torch.cuda.synchronize()
    assert bool((page_view(vr, 2) == -7).all())
    # the neighbours kept their data through it
    assert torch.equal(page_view(vr, 1).cpu(), torch.arange(n, dtype=torch.int32) + 1000)
    assert torch.equal(page_view(vr, 5).cpu(), torch.arange(n, dtype=torch.int32) + 5000)


def test_kept_handle_keeps_its_data(vr):
    """unmap(keep_handle=True) then map elsewhere reuses the same physical page."""
    vr.map(3)
    page_view(vr, 3).fill_(1234)
    torch.cuda.synchronize()
    vr.unmap(3, keep_handle=True)
    assert vr.held_bytes == vr.page_bytes and vr.mapped_bytes == 0
    vr.map(6)
    assert bool((page_view(vr, 6) == 1234).all())


def test_misuse_raises_clearly(vr):
    from tokenvm_vllm.elastic.vmm import CudaDriverError, map_handle

    vr.map(0)
    with pytest.raises(ValueError, match="page 0 is already mapped"):
        vr.map(0)
    with pytest.raises(ValueError, match="page 4 is not mapped"):
        vr.unmap(4)
    with pytest.raises(IndexError, match="page 8 outside 0..7"):
        vr.map(8)
    with pytest.raises(CudaDriverError, match=r"cuMemMap failed: CUresult \d+ \(CUDA_ERROR_"):
        map_handle(vr.address(1), vr.page_bytes, 0)  # handle 0 is no allocation


def test_physical_memory_follows_mapping():
    from tokenvm_vllm.elastic.vmm import VirtualRange

    torch.cuda.synchronize()
    free0, _ = torch.cuda.mem_get_info()
    with VirtualRange(1024 * MIB) as rng:
        free_reserved, _ = torch.cuda.mem_get_info()
        for p in range(rng.num_pages):
            rng.map(p)
        free_mapped, _ = torch.cuda.mem_get_info()
        for p in range(rng.num_pages):
            rng.unmap(p)
        free_unmapped, _ = torch.cuda.mem_get_info()
    slack = 64 * MIB  # the driver's own bookkeeping (page tables) moves a little
    assert free0 - free_reserved < slack, "reserving addresses took physical memory"
    assert free0 - free_mapped >= 1024 * MIB - slack
    assert free0 - free_mapped <= 1024 * MIB + slack
    assert free0 - free_unmapped < slack, "unmapped pages were not given back"


def test_map_from_a_fresh_thread(vr):
    """A background mapper thread has no current context until ensure_context sets one."""
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            vr.map(7)
        except BaseException as e:  # re-raised in the test thread below
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not errors, errors
    page_view(vr, 7).fill_(9)
    torch.cuda.synchronize()
    assert bool((page_view(vr, 7) == 9).all())


def test_page_groups_over_layer_ranges():
    """Four 'layers' of 64 KiB blocks: grow two groups, write every usable block of every layer,
    shrink one group, and the other's data survives."""
    from tokenvm_vllm.elastic.page_groups import (
        BlockState,
        PageGroupLayout,
        PageGroupPool,
        VmmMapper,
    )

    layers, block_bytes, num_blocks = 4, 64 * 1024, 128  # 4 groups of 32 blocks
    layout = PageGroupLayout([block_bytes] * layers, num_blocks)
    mapper = VmmMapper.allocate(layout, torch.cuda.current_device())
    try:
        pool = PageGroupPool(layout, mapper, floor_bytes=layout.group_bytes(0))
        plan = pool.grow(free_blocks=0, demand=40, ahead=10)
        assert plan.groups == (0, 1) and len(plan.new_blocks) == 64
        views = [rng.as_tensor(torch.int32, (num_blocks, block_bytes // 4))
                 for rng in mapper.ranges]
        for layer, v in enumerate(views):
            for b in plan.new_blocks:
                v[b].fill_(layer * 1000 + b)
        torch.cuda.synchronize()
        free_before, _ = torch.cuda.mem_get_info()
        shrink = pool.plan_shrink(lambda b: BlockState.IN_USE if b < 32 else BlockState.CACHED)
        assert shrink.groups == (1,) and shrink.spill == tuple(range(32, 64))
        pool.apply_shrink(shrink)
        free_after, _ = torch.cuda.mem_get_info()
        assert free_after - free_before >= layers * 2 * MIB - MIB
        for layer, v in enumerate(views):
            want = torch.arange(32, device="cuda", dtype=torch.int32) + layer * 1000
            assert torch.equal(v[:32, 0], want) and torch.equal(v[:32, -1], want)
    finally:
        torch.cuda.synchronize()
        mapper.release()
