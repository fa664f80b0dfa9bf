"""``elastic/vmm.py`` and ``page_groups.VmmMapper`` through ctypes against a stand-in libcuda
(``fake_libcuda.c``, compiled here; host memory plays device memory). CPU machines have no GPU,
so this is where CI exercises the argument types, struct fields, context handling and error paths
of the real ctypes code; ``tests/gpu/test_vmm.py`` runs the same code on the real driver.
Skipped when no C compiler is found."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tokenvm_vllm.elastic import vmm

MIB = 1 << 20
SOURCE = Path(__file__).with_name("fake_libcuda.c")
CC = shutil.which("cc") or shutil.which("gcc")

pytestmark = pytest.mark.skipif(CC is None, reason="needs a C compiler for the stand-in libcuda")


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fakecuda") / "libfakecuda.so"
    subprocess.run([CC, "-O1", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(out),
                    str(SOURCE)], check=True)
    return out


@pytest.fixture
def fake(fake_lib: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ctypes.CDLL]:
    """The stand-in loaded as vmm's driver; ``fake_used_bytes()`` counts physical bytes."""
    monkeypatch.setattr(vmm, "LIBCUDA", str(fake_lib))
    monkeypatch.setattr(vmm, "_driver", None)
    lib = ctypes.CDLL(str(fake_lib))
    lib.fake_used_bytes.restype = ctypes.c_ulonglong
    lib.fake_set_limit.argtypes = [ctypes.c_ulonglong]
    lib.fake_set_limit(1 << 40)
    yield lib
    lib.fake_set_limit(1 << 40)


def read_page(rng: vmm.VirtualRange, page: int) -> torch.Tensor:
    return vmm.tensor_view(rng.address(page), rng.page_bytes, torch.int32,
                           (rng.page_bytes // 4,), torch.device("cpu"))


def test_map_write_unmap_remap_and_memory_follows(fake):
    used0 = fake.fake_used_bytes()
    with vmm.VirtualRange(5 * MIB) as rng:  # rounds up to 3 pages
        assert (rng.num_pages, rng.page_bytes, rng.base % (2 * MIB)) == (3, 2 * MIB, 0)
        assert fake.fake_used_bytes() == used0  # reserving takes no memory
        rng.map(0)
        rng.map(2)
        assert fake.fake_used_bytes() - used0 == 4 * MIB
        read_page(rng, 0).fill_(11)
        read_page(rng, 2).copy_(torch.arange(rng.page_bytes // 4, dtype=torch.int32))
        rng.unmap(0)
        assert fake.fake_used_bytes() - used0 == 2 * MIB
        rng.map(0)
        read_page(rng, 0).fill_(12)
        assert bool((read_page(rng, 0) == 12).all())
        assert torch.equal(read_page(rng, 2), torch.arange(rng.page_bytes // 4,
                                                          dtype=torch.int32))
        # a kept handle carries its bytes to the next page mapped
        rng.unmap(2, keep_handle=True)
        assert rng.held_bytes == 4 * MIB and rng.mapped_pages == [0]
        rng.map(1)
        assert int(read_page(rng, 1)[12345]) == 12345
    assert fake.fake_used_bytes() == used0  # release() gave every page back


def test_driver_errors_name_the_call(fake):
    with vmm.VirtualRange(4 * MIB) as rng:
        with pytest.raises(vmm.CudaDriverError,
                           match=r"cuMemMap failed: CUresult 1 \(CUDA_ERROR_INVALID_VALUE: "
                                 r"invalid argument\)"):
            vmm.map_handle(rng.address(0), rng.page_bytes, 0)
        fake.fake_set_limit(fake.fake_used_bytes() + 2 * MIB)  # room for one page only
        rng.map(0)
        with pytest.raises(vmm.CudaDriverError, match="cuMemCreate failed.*OUT_OF_MEMORY"):
            rng.map(1)
        assert rng.mapped_pages == [0]  # the failed map left nothing behind
    with pytest.raises(ValueError, match="page_bytes=3145728 is not a multiple"):
        vmm.VirtualRange(8 * MIB, page_bytes=3 * MIB)


def test_fresh_thread_gets_the_primary_context(fake):
    results: dict[str, object] = {}
    with vmm.VirtualRange(4 * MIB) as rng:

        def bare() -> None:  # a raw call without ensure_context: the driver refuses
            try:
                vmm.create_handle(0, 2 * MIB)
                results["bare"] = "no error"
            except vmm.CudaDriverError as e:
                results["bare"] = str(e)

        def via_range() -> None:
            try:
                rng.map(1)
                results["range"] = "ok"
            except Exception as e:  # reported to the test thread
                results["range"] = repr(e)

        for fn in (bare, via_range):
            t = threading.Thread(target=fn)
            t.start()
            t.join()
        assert "CUDA_ERROR_INVALID_CONTEXT" in str(results["bare"])
        assert results["range"] == "ok" and rng.mapped_pages == [1]


def test_vmm_mapper_and_pool_over_fake_pages(fake):
    from tokenvm_vllm.elastic.page_groups import (
        BlockState,
        PageGroupLayout,
        PageGroupPool,
        VmmMapper,
    )

    used0 = fake.fake_used_bytes()
    layout = PageGroupLayout([64 << 10] * 4, 128)  # 4 layers, 4 groups of 32 blocks
    mapper = VmmMapper.allocate(layout)
    try:
        pool = PageGroupPool(layout, mapper, ceiling_bytes=3 * layout.group_bytes(0))
        plan = pool.grow(free_blocks=0, demand=128, ahead=0)
        assert plan.groups == (0, 1, 2) and plan.short_by == 32  # the ceiling stops at 3
        assert fake.fake_used_bytes() - used0 == 3 * 4 * 2 * MIB
        for rng in mapper.ranges:
            for g in plan.groups:
                read_page(rng, g).fill_(g + 1)
        shrink = pool.plan_shrink(lambda b: BlockState.IN_USE if b < 32 else BlockState.FREE)
        assert shrink.groups == (1, 2)
        pool.apply_shrink(shrink)
        assert fake.fake_used_bytes() - used0 == 4 * 2 * MIB
        assert all(bool((read_page(rng, 0) == 1).all()) for rng in mapper.ranges)
    finally:
        mapper.release()
    assert fake.fake_used_bytes() == used0


def test_bench_sections_run_against_the_fake(fake):
    """The benchmark's driver-only sections and its table, so the GPU run's code paths have
    run once before the GPU sees them."""
    from tokenvm_vllm.bench import vmm_bench

    page = vmm_bench.section_page(0, pages=8)
    assert page["create"]["n"] == 8 and page["kept_handle_map"]["n"] == 8
    assert page["set_access_run_of_32_us"] > 0
    group = vmm_bench.section_group(0, groups=2)
    assert group["v2_32_tensors"]["group_bytes"] == 64 * MIB
    assert group["v2_32_tensors"]["blocks_per_group"] == 32
    assert group["kv_apart_64_tensors"]["group_bytes"] == 128 * MIB
    assert group["kv_apart_64_tensors"]["map_group"]["n"] == 2
    res = {"info": {"error": "RuntimeError: x"}, "page": page, "group": group,
           "hidden": {"error": "RuntimeError: y"}, "physical": {"error": "z"},
           "view": {"error": "w"}, "elapsed_s": 1.0}
    text = vmm_bench.table(res)
    assert "page map_total" in text and "group v2_32_tensors (32 pages, 64 MiB" in text
    assert "hidden: ERROR RuntimeError: y" in text
    assert fake.fake_mapped_count() == 0


def test_overlap_and_full_table():
    """The hidden section's window arithmetic, and the table with every section present (the
    shapes the GPU sections return), so the summary printed last cannot crash there."""
    from tokenvm_vllm.bench import vmm_bench

    assert vmm_bench.overlap_ns([(0, 10), (5, 10), (20, 5), (28, 10)], (5, 30)) == 5 + 10 + 5 + 2
    st = vmm_bench.stats_us([1000, 2000, 3000])
    assert st["p50"] == 2.0 and st["max"] == 3.0 and st["n"] == 3
    assert vmm_bench.stats_us([]) == {"n": 0}
    res = {
        "info": {"gpu": "H200", "granularity_min": 2 * MIB, "granularity_recommended": 2 * MIB},
        "page": {k: st for k in ("create", "map", "set_access", "map_total", "kept_handle_map",
                                 "unmap", "release", "unmap_total", "kept_handle_unmap")}
        | {"set_access_run_of_32_us": 5.0, "section_s": 0.1},
        "group": {"v2_32_tensors": {"tensors": 32, "group_bytes": 64 * MIB,
                                    "blocks_per_group": 32, "map_group": st,
                                    "unmap_group": st},
                  "kv_apart_64_tensors": {"error": "CudaDriverError: boom"}, "section_s": 0.2},
        "hidden": {"matmul": 8192, "iters": 300, "tflops_alone": 780.0,
                   "tflops_with_mapper": 770.0, "slowdown": 1.013, "groups_mapped_during": 41.0,
                   "map_group_under_compute": st, "map_group_idle": st, "hidden_fraction": 0.97,
                   "errors": []},
        "physical": {"used_mib_vs_start": {"start": 0.0, "reserved": 0.0, "mapped": 1024.0}},
        "view": {"write_read_ok": True, "kept_handle_remap_ok": True, "section_s": 0.0},
        "gather": {"mib": 6144, "row_kib": 64, "rows_read": 327680, "cudamalloc_gb_s": 3000.0,
                   "vmm_gb_s": 2700.0, "vmm_x_cudamalloc": 0.9},
        "elapsed_s": 12.0,
    }
    text = vmm_bench.table(res)
    assert ("gather of random 64 KiB rows over 6144 MiB: cudaMalloc 3000 GB/s, VMM range "
            "2700 GB/s (0.900x)") in text
    assert "hidden: matmul 8192x300 780 TFLOP/s alone" in text and "hidden 0.97" in text
    assert "group kv_apart_64_tensors: ERROR CudaDriverError: boom" in text
    assert "physical MiB used vs start: reserved 0, mapped 1024" in text


def test_worker_maps_from_its_reserve_and_a_full_device_only_shrinks_the_reserve(fake):
    """``WorkerKV`` over ``VmmMapper`` over real ``VirtualRange`` code (stand-in driver): maps
    take reserved memory (no cuMemCreate on the step's path), a refill on a full device
    reserves less instead of failing, unmaps refill the reserve, a lower target frees it."""
    from tokenvm_vllm.elastic.page_groups import PageGroupLayout, VmmMapper
    from tokenvm_vllm.elastic.protocol import WorkerKV

    layout = PageGroupLayout([64 << 10] * 2, 128)  # 2 ranges of 4 pages: groups of 4 MiB
    kv = WorkerKV(layout, ())
    kv.mapper = VmmMapper.allocate(layout)
    used0 = fake.fake_used_bytes()
    try:
        kv.apply([], reserve=2)
        assert kv.refill() == (1, 2)
        assert fake.fake_used_bytes() - used0 == 2 * 4 * MIB
        kv.apply([("map", 0), ("map", 1)], reserve=2)
        assert kv.mapped == {0, 1}
        assert fake.fake_used_bytes() - used0 == 2 * 4 * MIB  # mapped from the reserve
        fake.fake_set_limit(fake.fake_used_bytes() + 2 * MIB)  # another process took the rest
        assert kv.refill() == (2, 0)  # room for one page of a group: nothing whole reserved
        with pytest.raises(vmm.CudaDriverError, match="OUT_OF_MEMORY"):
            kv.mapper.map_group(2)  # what a map without the reserve would do mid-step
        assert kv.mapper.spare_groups() == 0 and 2 not in kv.mapped
        kv.apply([("unmap", 1)], reserve=2)  # its memory stays, as reserve
        assert kv.mapper.spare_groups() == 1
        assert fake.fake_used_bytes() - used0 == 2 * 4 * MIB + 2 * MIB
        kv.apply([], reserve=0)  # idle: the reserve goes back to the device
        assert fake.fake_used_bytes() - used0 == 4 * MIB
    finally:
        kv.release()
    assert fake.fake_used_bytes() == used0


@pytest.mark.parametrize("use_compiled", [False, True], ids=["per-page", "compiled"])
def test_reserve_thread_creates_and_premaps_through_the_real_ctypes_calls(fake, use_compiled,
                                                                          request):
    """``WorkerKV`` with ``background`` (the CUDA default) and ``map_ahead`` over ``VmmMapper``
    (stand-in driver): ``refill`` returns before the driver work is done, the thread creates
    and maps the reserve at the lowest groups, a map command for one of them makes no driver
    call, steps with a full reserve do not wake the thread, a target of 0 gives every byte
    back, and ``release`` stops the thread."""
    from tokenvm_vllm.elastic.page_groups import PageGroupLayout, VmmMapper
    from tokenvm_vllm.elastic.protocol import WorkerKV

    if use_compiled:
        request.getfixturevalue("compiled")  # built into this test's cache directory
    layout = PageGroupLayout([64 << 10] * 2, 128)  # 2 ranges of 4 pages: groups of 4 MiB
    kv = WorkerKV(layout, (), map_ahead=True, background=True)
    kv.mapper = VmmMapper.allocate(layout, compiled=use_compiled)
    assert (kv.mapper.compiled is not None) == use_compiled
    used0 = fake.fake_used_bytes()
    try:
        kv.apply([], reserve=2)
        applied, _ = kv.refill()  # (what it reports depends on how far the thread got)
        assert applied == 1
        kv.settle()
        assert kv.thread_error is None and kv.reserved() == 2 and kv.premapped == {0, 1}
        assert [r.mapped_pages for r in kv.mapper.ranges] == [[0, 1]] * 2
        assert fake.fake_used_bytes() - used0 == 2 * 4 * MIB
        wakeups = kv.wakeups
        for _ in range(3):  # a full reserve: the steps leave the thread asleep
            kv.apply([], reserve=2)
            kv.refill()
        assert kv.wakeups == wakeups
        kv.apply([("map", 0)], reserve=2)
        assert kv.premap_hits == 1 and kv.mapped == {0} and kv.premapped == {1}
        kv.refill()
        kv.settle()
        assert kv.premapped == {1, 2} and fake.fake_used_bytes() - used0 == 3 * 4 * MIB
        kv.apply([], reserve=0)  # idle: premapped groups and spare memory go back
        kv.settle()
        assert not kv.premapped and kv.mapper.spare_groups() == 0
        assert fake.fake_used_bytes() - used0 == 4 * MIB  # group 0, the scheduler's
        thread = kv._thread
        assert thread is not None and thread.is_alive()
    finally:
        kv.release()
    assert not thread.is_alive() and fake.fake_used_bytes() == used0


@pytest.fixture
def compiled(fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ctypes.CDLL]:
    """``vmm_batch``'s compiled loop, built into a fresh cache directory for this test."""
    from tokenvm_vllm.elastic import vmm_batch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(vmm_batch, "_tried", False)
    monkeypatch.setattr(vmm_batch, "_lib", None)
    lib = vmm_batch.load()
    assert lib is not None and list((tmp_path / "cache" / "tokenvm").glob("*.so"))
    yield lib


def test_compiled_loop_creates_maps_and_fails_whole(fake, compiled):
    """``VmmMapper`` with the compiled loop (``csrc/vmm_batch.c``) over the stand-in driver: a
    range's reserve is created in one call (stopping at a full device, as per page), a group
    is mapped in one call, readable and writable, and unmapped as before; a map that fails
    part-way leaves none of its pages mapped, names the call and page, and keeps the handles."""
    from tokenvm_vllm.elastic import vmm_batch
    from tokenvm_vllm.elastic.page_groups import PageGroupLayout, VmmMapper

    layout = PageGroupLayout([64 << 10] * 4, 128)  # 4 ranges of 4 pages: groups of 8 MiB
    mapper = VmmMapper.allocate(layout, compiled=True)
    assert mapper.compiled is compiled
    used0, mapped0 = fake.fake_used_bytes(), fake.fake_mapped_count()
    try:
        assert mapper.refill(2) == 2
        assert fake.fake_used_bytes() - used0 == 4 * 2 * 2 * MIB
        mapper.map_group(1)
        assert [r.mapped_pages for r in mapper.ranges] == [[1]] * 4
        assert fake.fake_mapped_count() - mapped0 == 4 and mapper.spare_groups() == 1
        for value, rng in enumerate(mapper.ranges):
            read_page(rng, 1).fill_(value + 7)
        assert [int(read_page(r, 1)[99]) for r in mapper.ranges] == [7, 8, 9, 10]
        mapper.unmap_group(1, keep=True)
        assert fake.fake_mapped_count() == mapped0 and mapper.spare_groups() == 2

        # part-way failure: the third page's address is already mapped (by the per-page path)
        rngs = mapper.ranges
        rngs[2].map(3)
        pages = [rng.take_spare(3) for rng in rngs[:2]] + [rngs[3].take_spare(3)]
        bad = [pages[0], pages[1], (rngs[2].address(3), pages[2][1])]
        with pytest.raises(vmm.CudaDriverError, match=r"cuMemMap \(page 2 of 3\)"):
            vmm_batch.map_pages(compiled, [a for a, _ in bad], [h for _, h in bad],
                                layout.page_bytes, 0)
        assert fake.fake_mapped_count() - mapped0 == 1  # only rngs[2]'s own page 3
        for rng, (_, handle) in zip([rngs[0], rngs[1], rngs[3]], pages, strict=True):
            rng.return_spare(handle)  # the handles are still good: map them for real
        rngs[2].unmap(3)
        mapper.map_group(3)
        assert [r.mapped_pages for r in mapper.ranges] == [[3]] * 4

        # a full device: the compiled creation stops there, as the per-page one does
        fake.fake_set_limit(fake.fake_used_bytes() + 2 * 2 * MIB)
        assert mapper.ranges[0].add_spares(5, compiled) == 2
    finally:
        mapper.release()
    assert fake.fake_used_bytes() == used0


def test_without_a_compiler_the_mapper_calls_per_page(fake, tmp_path, monkeypatch, caplog):
    """No C compiler (or no source): ``load`` says so once and returns None; the mapper then
    makes one ctypes call per page, with the same result."""
    import logging

    from tokenvm_vllm.elastic import vmm_batch
    from tokenvm_vllm.elastic.page_groups import PageGroupLayout, VmmMapper

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(vmm_batch, "_tried", False)
    monkeypatch.setattr(vmm_batch, "_lib", None)
    monkeypatch.setattr(vmm_batch.shutil, "which", lambda name: None)
    with caplog.at_level(logging.INFO, logger="vllm.tokenvm"):
        layout = PageGroupLayout([64 << 10] * 2, 128)
        mapper = VmmMapper.allocate(layout, compiled=True)
        assert vmm_batch.load() is None
    assert mapper.compiled is None
    assert sum("no compiled VMM loop (no C compiler" in r.message for r in caplog.records) == 1
    try:
        mapper.refill(1)
        mapper.map_group(0)
        assert [r.mapped_pages for r in mapper.ranges] == [[0]] * 2
    finally:
        mapper.release()
