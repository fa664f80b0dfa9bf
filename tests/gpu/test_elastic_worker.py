"""Elastic GPU KV's worker side on a real GPU (``elastic/protocol.py``): the allocation hook's
half, ``WorkerKV.allocate``, and the application of the scheduler's commands. Skipped without
CUDA (CI has none); ``ci/gpu/run.sh tests`` runs it. The end-to-end check with vLLM is
``ci/gpu/elastic_exact.py``."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MIB = 1 << 20
BLOCK = 32 * 1024  # 64 blocks per 2 MiB page


class Held(tuple):
    """The fixture's ``(kv, tensors)``. pytest prints a failing test's arguments, and printing a
    tensor reads all of it: on unmapped VMM pages that is an illegal address, which poisons the
    CUDA context for every later test in the process (seen on the H200: one failed assertion
    turned into 16 failures)."""

    def __repr__(self) -> str:
        return "(WorkerKV, its VMM-backed tensors: not printed)"


@pytest.fixture
def worker_kv():
    from tokenvm_vllm.elastic.page_groups import PageGroupLayout
    from tokenvm_vllm.elastic.protocol import WorkerKV, initial_groups

    torch.cuda.init()
    layout = PageGroupLayout([BLOCK, BLOCK], num_blocks=8 * 64)  # 2 layers, 8 page groups
    kv = WorkerKV(layout, initial_groups(layout, 0, None), cuda=True)
    device = torch.device("cuda", torch.cuda.current_device())
    tensors = kv.allocate([8 * 64 * BLOCK] * 2, device)
    yield Held((kv, tensors))
    torch.cuda.synchronize()
    kv.release()


def test_allocation_is_vllm_shaped_zeroed_and_fully_mapped_for_warm_up(worker_kv):
    kv, tensors = worker_kv
    assert [t.dtype for t in tensors] == [torch.int8] * 2
    assert [t.numel() for t in tensors] == [8 * 64 * BLOCK] * 2
    assert kv.mapped == set(range(8)) and kv.warming_up
    # what vLLM's runner does with the raw tensor: a bf16 view in its KV cache shape
    cache = tensors[0].view(torch.bfloat16).view(8 * 64, 2, 16, 8, 64)
    assert int(cache.float().abs().sum().item()) == 0
    cache[100].fill_(1.0)  # a warm-up write into block 100 (group 1)
    torch.cuda.synchronize()


def test_first_step_trims_then_commands_map_zeroed_pages_and_free_memory(worker_kv):
    kv, tensors = worker_kv
    tensors[1].fill_(7)  # garbage everywhere, as warm-up could leave
    torch.cuda.synchronize()
    free_full, _ = torch.cuda.mem_get_info()
    kv.apply([])  # the first step: only the null block's group stays
    assert kv.mapped == {0} and not kv.warming_up
    free_trimmed, _ = torch.cuda.mem_get_info()
    assert free_trimmed - free_full >= 7 * 2 * 2 * MIB  # 7 groups of 2 pages given back
    kv.apply([("map", 3)])
    torch.cuda.synchronize()
    free_mapped, _ = torch.cuda.mem_get_info()
    block = tensors[1].view(8 * 64, BLOCK)
    assert int(block[3 * 64:4 * 64].abs().sum().item()) == 0  # remapped pages are zeroed
    block[3 * 64 + 5].fill_(42)
    assert int(block[3 * 64 + 5].float().mean().item()) == 42
    assert int(block[0].abs().sum().item()) == 7 * BLOCK  # group 0 kept its bytes
    kv.apply([("unmap", 3)])
    assert kv.mapped == {0} and kv.unmaps == 1
    free_after, _ = torch.cuda.mem_get_info()
    assert free_after - free_mapped >= 2 * 2 * MIB  # the unmap gave the group's pages back


def test_a_warm_up_that_does_not_fit_stops_start_up_with_one_line_and_leaves_nothing():
    """Two servers starting at once on one GPU: the second's warm-up mapping (the whole range)
    finds too little memory; start-up stops with a line that says what to do, and the pages it
    had mapped are given back."""
    from tokenvm_vllm.elastic.page_groups import PageGroupLayout
    from tokenvm_vllm.elastic.protocol import WorkerKV, initial_groups

    torch.cuda.init()
    free, _ = torch.cuda.mem_get_info()
    blocks = (free // (2 * MIB) + 64) * 64  # more 2 MiB page groups than the GPU has free
    layout = PageGroupLayout([BLOCK], num_blocks=blocks)
    kv = WorkerKV(layout, initial_groups(layout, 0, None), cuda=True)
    device = torch.device("cuda", torch.cuda.current_device())
    with pytest.raises(RuntimeError, match="warm-up needs the whole KV range.*start this server "
                                           "once the other servers on this GPU have started"):
        kv.allocate([blocks * BLOCK], device)
    torch.cuda.synchronize()
    after, _ = torch.cuda.mem_get_info()
    assert after >= free - 64 * MIB  # the mapped part went back


def test_maps_take_the_reserve_and_a_full_gpu_reserves_less_instead_of_failing(worker_kv):
    """The reserve on the real driver: the first step keeps 2 groups of warm-up memory
    reserved, a map takes reserved memory (device memory does not move), and when another
    allocation leaves the GPU almost full a refill reports fewer reserved groups rather than
    raising (``elastic/protocol.py``: the scheduler then maps no more than that)."""
    kv, tensors = worker_kv
    torch.cuda.synchronize()
    free_full, _ = torch.cuda.mem_get_info()
    kv.apply([], reserve=2)  # the first step: 5 of the 7 trimmed groups go back, 2 reserved
    assert kv.mapped == {0} and kv.mapper.spare_groups() == 2
    free_trimmed, _ = torch.cuda.mem_get_info()
    assert free_trimmed - free_full >= 5 * 2 * 2 * MIB
    kv.apply([("map", 3), ("map", 5)], reserve=2)
    torch.cuda.synchronize()
    free_mapped, _ = torch.cuda.mem_get_info()
    assert abs(free_mapped - free_trimmed) < 2 * 2 * MIB  # no new memory for the maps
    assert int(tensors[1].view(8 * 64, BLOCK)[5 * 64:6 * 64].abs().sum().item()) == 0
    kv.refill()  # after the step (build_worker_meta); the reserve thread does the work
    kv.settle()
    assert kv.report() == (2, 2) and kv.thread_error is None
    from tokenvm_vllm.elastic import vmm

    device = torch.cuda.current_device()
    vmm.driver().ensure_context(device)
    hog: list[torch.Tensor] = []
    pages: list[int] = []
    try:
        # Another process takes the GPU's memory: here this one, 256 MiB tensors, then the
        # rest page by page (2 MiB physical allocations) until the driver has none left.
        while True:
            try:
                hog.append(torch.empty(256 * MIB, dtype=torch.uint8, device="cuda"))
            except torch.OutOfMemoryError:
                break
        while True:
            try:
                pages.append(vmm.create_handle(device, 2 * MIB))
            except vmm.CudaDriverError:
                break
        kv.apply([("map", 1), ("map", 2)], reserve=2)  # the reserve covers these
        kv.refill()
        kv.settle()
        applied, reserved = kv.report()  # no room for 2 more groups: fewer, no error
        assert applied == 3 and reserved < 2
        assert kv.mapped == {0, 1, 2, 3, 5}
    finally:
        for handle in pages:
            vmm.release_handle(handle)
        del hog
        torch.cuda.empty_cache()


def test_map_ahead_maps_the_reserve_zeroed_and_a_command_then_costs_no_driver_call(worker_kv):
    """``elastic_map_ahead``: ``refill`` maps the reserve at the next groups and zeroes them; the
    scheduler's map of such a group makes no driver call, and its pages read zero; an idle
    target of 0 unmaps them and gives the memory back."""
    kv, tensors = worker_kv
    kv.map_ahead = True
    tensors[0].fill_(9)  # garbage, as warm-up could leave
    torch.cuda.synchronize()
    kv.apply([], reserve=2)  # the first step: trims to the null block's group, keeps 2 spare
    kv.refill()  # the reserve thread creates, maps and zeroes (on its own stream)
    kv.settle()
    assert kv.report() == (1, 2) and kv.premapped == {1, 2} and kv.thread_error is None
    ranges = kv.mapper.ranges
    maps_before = [r.mapped_pages for r in ranges]
    assert maps_before == [[0, 1, 2]] * 2  # the reserve is mapped at groups 1 and 2
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free_premapped, _ = torch.cuda.mem_get_info()
    kv.apply([("map", 1)], reserve=2)
    assert [r.mapped_pages for r in ranges] == maps_before and kv.premap_hits == 1
    torch.cuda.synchronize()
    block = tensors[0].view(8 * 64, BLOCK)
    assert int(block[64:128].abs().sum().item()) == 0  # premapped pages were zeroed
    block[64 + 3].fill_(5)
    assert int(block[64 + 3].float().mean().item()) == 5
    kv.apply([], reserve=0)  # idle: the premapped group and the spare memory go back
    torch.cuda.synchronize()
    # The checks above allocated temporaries; torch's cache would hold their segment (the H200
    # run saw free memory 18 MiB lower) and hide the pages given back.
    torch.cuda.empty_cache()
    free_idle, _ = torch.cuda.mem_get_info()
    assert not kv.premapped and kv.mapper.spare_groups() == 0
    assert [r.mapped_pages for r in ranges] == [[0, 1]] * 2  # group 2 unmapped, 1 kept
    assert free_idle - free_premapped >= 2 * 2 * MIB  # group 2's two pages came back


def test_compiled_maps_on_the_reserve_thread_map_zeroed_usable_pages(tmp_path, monkeypatch):
    """``elastic_compiled_maps`` with ``elastic_map_ahead`` on the real driver: the reserve is
    created and premapped by the thread through the compiled loop (``csrc/vmm_batch.c``), a
    command for a premapped group hands over zeroed, writable pages, and a target of 0 gives
    them back. Skipped where the loop cannot be built (no C compiler)."""
    from tokenvm_vllm.elastic import vmm_batch
    from tokenvm_vllm.elastic.page_groups import PageGroupLayout
    from tokenvm_vllm.elastic.protocol import WorkerKV, initial_groups

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(vmm_batch, "_tried", False)
    monkeypatch.setattr(vmm_batch, "_lib", None)
    if vmm_batch.load() is None:
        pytest.skip("the compiled VMM loop cannot be built here")
    torch.cuda.init()
    layout = PageGroupLayout([BLOCK, BLOCK], num_blocks=8 * 64)
    kv = WorkerKV(layout, initial_groups(layout, 0, None), cuda=True, map_ahead=True,
                  compiled_maps=True)
    device = torch.device("cuda", torch.cuda.current_device())
    tensors = kv.allocate([8 * 64 * BLOCK] * 2, device)
    try:
        assert kv.mapper.compiled is not None and kv.background
        tensors[0].fill_(9)  # garbage, as warm-up could leave
        torch.cuda.synchronize()
        kv.apply([], reserve=3)
        kv.refill()
        kv.settle()
        assert kv.thread_error is None and kv.premapped == {1, 2, 3}
        kv.apply([("map", 2)], reserve=3)  # the step's stream waits for the thread's zeroing
        block = tensors[0].view(8 * 64, BLOCK)
        assert int(block[2 * 64:3 * 64].abs().sum().item()) == 0
        block[2 * 64 + 1].fill_(6)
        assert int(block[2 * 64 + 1].float().mean().item()) == 6
        kv.apply([], reserve=0)
        kv.settle()
        assert not kv.premapped and [r.mapped_pages for r in kv.mapper.ranges] == [[0, 2]] * 2
    finally:
        torch.cuda.synchronize()
        kv.release()
