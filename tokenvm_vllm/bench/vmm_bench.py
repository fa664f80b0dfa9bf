"""CUDA VMM benchmark (GPU): what elastic KV memory's mapping costs, and how much of it hides.

Measured, each section on its own (an error in one is recorded in the JSON and the table, and
the rest still run):

- ``info``: GPU, driver, torch; the allocation granularity (minimum and recommended).
- ``page``: per 2 MiB page, over ``--pages`` pages (512: 1 GiB): ``cuMemCreate``, ``cuMemMap``,
  ``cuMemSetAccess``, ``cuMemUnmap``, ``cuMemRelease`` one by one (p50/p99/mean, us); the same
  map with a kept handle (no create: what a pool of spare pages buys); and ``cuMemSetAccess``
  once over a run of contiguous pages instead of once per page.
- ``group``: per page group of a Llama-3.1-8B-shaped KV cache (16-token blocks, 8 KV heads,
  head 128, bf16): 32 per-layer tensors with K and V together (vLLM's V2 runner, 64 KiB blocks,
  a group = 32 pages = 64 MiB), and 64 tensors with K and V apart (32 KiB blocks, 64 pages =
  128 MiB); each group timed as one map / one unmap through ``VmmMapper``.
- ``hidden``: a bf16 matmul loop (``--matmul`` square, ~1.4 ms/iter at 8192 on an H200) timed
  alone and while a second thread maps and unmaps page groups of the V2 shape; the slowdown,
  the groups mapped meanwhile, and the share of the mapper's busy time the GPU did not feel.
- ``physical``: ``torch.cuda.mem_get_info`` around reserving, mapping (``--physical-mib``,
  1 GiB), unmapping with handles kept, and releasing them: memory follows the mapping.
- ``view``: data written through a torch view of mapped pages reads back, and survives an
  unmap/remap with a kept handle.

    python -m tokenvm_vllm.bench.vmm_bench --out vmm_bench.json [--quick]

Runs in well under a minute on an H200 (``--quick``: a few seconds). Prints the table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIB = 1 << 20
LAYERS, BLOCK_TOKENS, KV_HEADS, HEAD, DTYPE_BYTES = 32, 16, 8, 128, 2
KV_BLOCK_BYTES = BLOCK_TOKENS * KV_HEADS * HEAD * 2 * DTYPE_BYTES  # K+V, one layer: 64 KiB


def stats_us(samples_ns: list[int]) -> dict[str, float]:
    """p50/p99/mean/max of nanosecond samples, in microseconds."""
    if not samples_ns:
        return {"n": 0}
    s = sorted(samples_ns)

    def pick(q: float) -> float:  # nearest rank
        return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))] / 1e3

    return {"n": len(s), "p50": pick(0.5), "p99": pick(0.99),
            "mean": statistics.fmean(s) / 1e3, "max": s[-1] / 1e3}


def timed(fn: Callable[..., object], *args: Any) -> int:
    """Wall time of ``fn(*args)`` in ns."""
    t0 = time.perf_counter_ns()
    fn(*args)
    return time.perf_counter_ns() - t0


def section_info(device: int) -> dict[str, Any]:
    import torch

    from tokenvm_vllm.elastic import vmm

    drv = vmm.driver()
    drv.ensure_context(device)
    return {
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "granularity_min": vmm.granularity(device),
        "granularity_recommended": vmm.granularity(device, recommended=True),
        "free_total_bytes": list(torch.cuda.mem_get_info(device)),
    }


def section_page(device: int, pages: int) -> dict[str, Any]:
    """Each driver call per page, separately timed."""
    from tokenvm_vllm.elastic import vmm

    out: dict[str, Any] = {"pages": pages}
    with vmm.VirtualRange(pages * vmm.granularity(device), device) as rng:
        page = rng.page_bytes
        t: dict[str, list[int]] = {k: [] for k in
                                   ("create", "map", "set_access", "unmap", "release")}
        handles: list[int] = []
        for i in range(pages):
            addr = rng.base + i * page
            t0 = time.perf_counter_ns()
            h = vmm.create_handle(device, page)
            t1 = time.perf_counter_ns()
            vmm.map_handle(addr, page, h)
            t2 = time.perf_counter_ns()
            vmm.set_access(addr, page, device)
            t3 = time.perf_counter_ns()
            handles.append(h)
            t["create"].append(t1 - t0)
            t["map"].append(t2 - t1)
            t["set_access"].append(t3 - t2)
        for i, h in enumerate(handles):
            addr = rng.base + i * page
            t0 = time.perf_counter_ns()
            vmm.unmap(addr, page)
            t1 = time.perf_counter_ns()
            vmm.release_handle(h)
            t2 = time.perf_counter_ns()
            t["unmap"].append(t1 - t0)
            t["release"].append(t2 - t1)
        for k, v in t.items():
            out[k] = stats_us(v)
        out["map_total"] = stats_us([a + b + c for a, b, c in
                                     zip(t["create"], t["map"], t["set_access"], strict=True)])
        out["unmap_total"] = stats_us([a + b for a, b in
                                       zip(t["unmap"], t["release"], strict=True)])

        # Through VirtualRange, with handles kept: map = cuMemMap + cuMemSetAccess only.
        for i in range(pages):
            rng.map(i)
        for i in range(pages):
            rng.unmap(i, keep_handle=True)
        kept_map = [timed(rng.map, i) for i in range(pages)]
        kept_unmap = [timed(rng.unmap, i, True) for i in range(pages)]
        out["kept_handle_map"] = stats_us(kept_map)
        out["kept_handle_unmap"] = stats_us(kept_unmap)
        rng.drop_spares()

        # One cuMemSetAccess over a contiguous run of 32 pages instead of 32 calls.
        run = min(32, pages)
        handles = [vmm.create_handle(device, page) for _ in range(run)]
        for i, h in enumerate(handles):
            vmm.map_handle(rng.base + i * page, page, h)
        out["set_access_run_of_32_us"] = timed(
            lambda: vmm.set_access(rng.base, run * page, device)) / 1e3
        for i, h in enumerate(handles):
            vmm.unmap(rng.base + i * page, page)
            vmm.release_handle(h)
    return out


def llama_layout(kv_apart: bool, groups: int) -> Any:
    from tokenvm_vllm.elastic.page_groups import PageGroupLayout

    per_page = 2 * MIB // KV_BLOCK_BYTES  # 32 blocks of 64 KiB per page
    if kv_apart:
        return PageGroupLayout([KV_BLOCK_BYTES // 2] * (2 * LAYERS), per_page * 2 * groups)
    return PageGroupLayout([KV_BLOCK_BYTES] * LAYERS, per_page * groups)


def section_group(device: int, groups: int) -> dict[str, Any]:
    from tokenvm_vllm.elastic.page_groups import VmmMapper

    out: dict[str, Any] = {}
    for name, apart in (("v2_32_tensors", False), ("kv_apart_64_tensors", True)):
        try:
            layout = llama_layout(apart, groups)
            mapper = VmmMapper.allocate(layout, device)
            try:
                n = layout.num_groups
                maps = [timed(mapper.map_group, g) for g in range(n)]
                unmaps = [timed(mapper.unmap_group, g) for g in range(n)]
            finally:
                mapper.release()
            out[name] = {
                "tensors": len(layout.block_bytes), "groups": n,
                "group_bytes": layout.group_bytes(0),
                "blocks_per_group": len(layout.blocks_of_group(0)),
                "map_group": stats_us(maps), "unmap_group": stats_us(unmaps),
            }
        except Exception as e:  # one variant failing must not lose the other
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def overlap_ns(ops: list[tuple[int, int]], window: tuple[int, int]) -> int:
    """Nanoseconds of the ``(start, duration)`` operations that fall inside ``window``
    (``(start, end)``), clipping the ones that straddle its edges."""
    ws, we = window
    return sum(max(0, min(s + d, we) - max(s, ws)) for s, d in ops)


def section_hidden(device: int, size: int, iters: int, groups: int) -> dict[str, Any]:
    """Matmul loop alone vs with a thread mapping and unmapping V2-shaped page groups.

    ``hidden_fraction`` = 1 - (loop time added) / (mapper time inside the timed loops): 1.0 means
    the GPU did not notice the mapping at all; the mapper's calls are counted only within the
    loop's window, so the cycle it finishes after the loop ends does not inflate it.
    """
    import torch

    from tokenvm_vllm.elastic.page_groups import VmmMapper

    a = torch.randn(size, size, device=f"cuda:{device}", dtype=torch.bfloat16)
    b = torch.randn(size, size, device=f"cuda:{device}", dtype=torch.bfloat16)
    c = torch.empty_like(a)

    def loop() -> tuple[int, int]:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter_ns()
        for _ in range(iters):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize(device)
        return t0, time.perf_counter_ns()

    for _ in range(3):
        loop()  # warm-up: clocks up, cuBLAS heuristics cached
    layout = llama_layout(False, groups)
    mapper = VmmMapper.allocate(layout, device)
    n = layout.num_groups
    try:
        # the mapper alone, with an idle GPU, for comparison
        idle_maps = [timed(mapper.map_group, g) for g in range(n)]
        idle_unmaps = [timed(mapper.unmap_group, g) for g in range(n)]
        stop = threading.Event()
        maps: list[tuple[int, int]] = []  # (start ns, duration ns)
        unmaps: list[tuple[int, int]] = []
        errors: list[str] = []

        def churn() -> None:
            try:
                while not stop.is_set():  # whole cycles: every group is unmapped on exit
                    for g in range(n):
                        t = time.perf_counter_ns()
                        mapper.map_group(g)
                        maps.append((t, time.perf_counter_ns() - t))
                    for g in range(n):
                        t = time.perf_counter_ns()
                        mapper.unmap_group(g)
                        unmaps.append((t, time.perf_counter_ns() - t))
            except Exception as e:  # reported, not raised: the compute side still finishes
                errors.append(f"{type(e).__name__}: {e}")

        alone: list[float] = []
        together: list[float] = []
        windows: list[tuple[int, int]] = []
        for _ in range(3):  # interleaved, so clock drift hits both sides alike
            t0, t1 = loop()
            alone.append((t1 - t0) / 1e9)
            stop.clear()
            th = threading.Thread(target=churn, daemon=True)
            th.start()
            time.sleep(0.002)  # let the mapper get going before the clock starts
            window = loop()
            windows.append(window)
            together.append((window[1] - window[0]) / 1e9)
            stop.set()
            th.join()
            if errors:
                break
    finally:
        torch.cuda.synchronize(device)
        mapper.release()

    def inside(ops: list[tuple[int, int]]) -> list[int]:
        return [d for s, d in ops if any(ws <= s < we for ws, we in windows)]

    busy_ns = sum(overlap_ns(maps + unmaps, w) for w in windows)
    t_alone, t_with = statistics.median(alone), statistics.median(together)
    mapper_busy_s = busy_ns / 1e9 / max(1, len(windows))  # per loop, on average
    extra = max(0.0, t_with - t_alone)
    flops = 2 * size ** 3 * iters
    return {
        "matmul": size, "iters": iters,
        "loop_alone_s": alone, "loop_with_mapper_s": together,
        "tflops_alone": flops / t_alone / 1e12, "tflops_with_mapper": flops / t_with / 1e12,
        "slowdown": t_with / t_alone,
        "groups_mapped_during": len(inside(maps)) / max(1, len(windows)),
        "group_bytes": layout.group_bytes(0),
        "map_group_idle": stats_us(idle_maps), "unmap_group_idle": stats_us(idle_unmaps),
        "map_group_under_compute": stats_us(inside(maps)),
        "unmap_group_under_compute": stats_us(inside(unmaps)),
        "mapper_busy_s_per_loop": mapper_busy_s,
        "hidden_fraction": (1.0 - extra / mapper_busy_s) if mapper_busy_s > 0 else None,
        "errors": errors,
    }


def section_physical(device: int, mib: int) -> dict[str, Any]:
    import torch

    from tokenvm_vllm.elastic.vmm import VirtualRange

    def free() -> int:
        torch.cuda.synchronize(device)
        return int(torch.cuda.mem_get_info(device)[0])

    steps: dict[str, int] = {"start": free()}
    with VirtualRange(mib * MIB, device) as rng:
        steps["reserved"] = free()
        for p in range(rng.num_pages):
            rng.map(p)
        steps["mapped"] = free()
        for p in range(rng.num_pages):
            rng.unmap(p, keep_handle=True)
        steps["unmapped_handles_kept"] = free()
        rng.drop_spares()
        steps["handles_released"] = free()
    steps["range_freed"] = free()
    used = {k: (steps["start"] - v) / MIB for k, v in steps.items()}
    return {"mib": mib, "free_bytes": steps, "used_mib_vs_start": used}


def section_gather(device: int, mib: int, row_kib: int = 64, iters: int = 20) -> dict[str, Any]:
    """Is KV memory in a VMM range (2 MiB pages, mapped one by one) slower to read than the
    same bytes from cudaMalloc? Elastic decode steps ran 1.16-1.37x slower than the fixed
    pool's in one H200 run. A random gather of ``row_kib`` rows (a block of one layer, as
    attention reads it) over ``mib`` of each kind, GB/s."""
    import torch

    from tokenvm_vllm.elastic.vmm import VirtualRange

    rows = mib * MIB // (row_kib * 1024)
    width = row_kib * 1024 // 2
    gen = torch.Generator(device=f"cuda:{device}").manual_seed(0)
    index = torch.randint(0, rows, (min(rows, 16384),), device=f"cuda:{device}", generator=gen)

    def gbs(table: torch.Tensor) -> float:
        out = torch.empty((index.numel(), width), dtype=torch.bfloat16, device=table.device)
        torch.index_select(table, 0, index, out=out)
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.index_select(table, 0, index, out=out)
        end.record()
        torch.cuda.synchronize(device)
        seconds = float(start.elapsed_time(end)) / 1e3
        return float(index.numel() * row_kib * 1024 * iters / seconds / 1e9)

    plain = torch.zeros((rows, width), dtype=torch.bfloat16, device=f"cuda:{device}")
    plain_gbs = gbs(plain)
    del plain
    torch.cuda.empty_cache()
    with VirtualRange(mib * MIB, device) as rng:
        for p in range(rng.num_pages):
            rng.map(p)
        table = rng.as_tensor(torch.bfloat16, (rows, width))
        table.zero_()
        vmm_gbs = gbs(table)
        del table
        torch.cuda.synchronize(device)
    return {"mib": mib, "row_kib": row_kib, "rows_read": int(index.numel()) * iters,
            "cudamalloc_gb_s": plain_gbs, "vmm_gb_s": vmm_gbs, "vmm_x_cudamalloc":
            vmm_gbs / plain_gbs}


def section_view(device: int) -> dict[str, Any]:
    import torch

    from tokenvm_vllm.elastic.vmm import VirtualRange

    with VirtualRange(4 * 2 * MIB, device) as rng:
        rng.map(2)  # pages 0, 1, 3 stay unmapped: the view must not touch them
        n = rng.page_bytes // 4
        view = rng.as_tensor(torch.int32)[2 * n:3 * n]
        view.copy_(torch.arange(n, dtype=torch.int32, device=f"cuda:{device}"))
        torch.cuda.synchronize(device)
        ok_write = bool(torch.equal(view.cpu(), torch.arange(n, dtype=torch.int32)))
        rng.unmap(2, keep_handle=True)
        rng.map(3)
        view3 = rng.as_tensor(torch.int32)[3 * n:4 * n]
        ok_remap = bool(torch.equal(view3.cpu(), torch.arange(n, dtype=torch.int32)))
        torch.cuda.synchronize(device)
    return {"write_read_ok": ok_write, "kept_handle_remap_ok": ok_remap}


def fmt(d: dict[str, Any] | None, key: str = "p50") -> str:
    if not d or key not in d:
        return "-"
    return f"{d[key]:.1f}"


def table(res: dict[str, Any]) -> str:
    """The short summary printed last."""
    lines = ["== vmm_bench summary (us unless stated; p50 / p99)"]
    info = res.get("info", {})
    if "error" in info:
        lines.append(f"info: ERROR {info['error']}")
    else:
        lines.append(f"gpu {info.get('gpu')}  granularity {info.get('granularity_min')} B "
                     f"(recommended {info.get('granularity_recommended')})")
    page = res.get("page", {})
    if "error" in page:
        lines.append(f"page: ERROR {page['error']}")
    else:
        for k in ("create", "map", "set_access", "map_total", "kept_handle_map", "unmap",
                  "release", "unmap_total", "kept_handle_unmap"):
            lines.append(f"page {k:<18} {fmt(page.get(k)):>9} / {fmt(page.get(k), 'p99'):>9}")
        lines.append(f"page set_access over 32 contiguous pages: "
                     f"{page.get('set_access_run_of_32_us', float('nan')):.1f}")
    group = res.get("group", {})
    if "error" in group:
        lines.append(f"group: ERROR {group['error']}")
    for name, g in group.items():
        if not isinstance(g, dict):
            continue  # section_s
        if "error" in g:
            lines.append(f"group {name}: ERROR {g['error']}")
            continue
        lines.append(f"group {name} ({g['tensors']} pages, {g['group_bytes'] // MIB} MiB, "
                     f"{g['blocks_per_group']} blocks): map {fmt(g['map_group'])} / "
                     f"{fmt(g['map_group'], 'p99')}, unmap {fmt(g['unmap_group'])} / "
                     f"{fmt(g['unmap_group'], 'p99')}")
    h = res.get("hidden", {})
    if "error" in h:
        lines.append(f"hidden: ERROR {h['error']}")
    elif h:
        hf = h.get("hidden_fraction")
        lines.append(
            f"hidden: matmul {h['matmul']}x{h['iters']} {h['tflops_alone']:.0f} TFLOP/s alone, "
            f"{h['tflops_with_mapper']:.0f} with mapper (slowdown {h['slowdown']:.3f}); "
            f"{h['groups_mapped_during']:.0f} groups mapped per loop meanwhile, map p50 "
            f"{fmt(h['map_group_under_compute'])} vs idle {fmt(h['map_group_idle'])}; hidden "
            f"{'-' if hf is None else f'{hf:.2f}'}" + (f"; errors {h['errors']}"
                                                       if h.get("errors") else ""))
    gather = res.get("gather", {})
    if "error" in gather:
        lines.append(f"gather: ERROR {gather['error']}")
    elif gather:
        lines.append(f"gather of random {gather['row_kib']} KiB rows over {gather['mib']} MiB: "
                     f"cudaMalloc {gather['cudamalloc_gb_s']:.0f} GB/s, VMM range "
                     f"{gather['vmm_gb_s']:.0f} GB/s ({gather['vmm_x_cudamalloc']:.3f}x)")
    p = res.get("physical", {})
    if "error" in p:
        lines.append(f"physical: ERROR {p['error']}")
    elif p:
        u = p["used_mib_vs_start"]
        lines.append("physical MiB used vs start: " + ", ".join(
            f"{k} {v:.0f}" for k, v in u.items() if k != "start"))
    v = res.get("view", {})
    lines.append(f"view: {'ERROR ' + v['error'] if 'error' in v else v}")
    lines.append(f"total {res.get('elapsed_s', 0):.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=Path("vmm_bench.json"))
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="fewer pages, groups and iterations")
    ap.add_argument("--pages", type=int, default=None, help="pages timed one by one (512)")
    ap.add_argument("--groups", type=int, default=None, help="page groups per layout (64)")
    ap.add_argument("--matmul", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=None, help="matmuls per timed loop (300)")
    ap.add_argument("--physical-mib", type=int, default=1024)
    ap.add_argument("--gather-mib", type=int, default=6144,
                    help="bytes of KV each kind holds for the random-gather read (6144)")
    ap.add_argument("--only", default="", help="comma-separated sections to run (all)")
    args = ap.parse_args(argv)
    pages = args.pages or (64 if args.quick else 512)
    groups = args.groups or (8 if args.quick else 64)
    iters = args.iters or (50 if args.quick else 300)

    t0 = time.perf_counter()
    res: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA GPU")
        torch.cuda.init()
        torch.cuda.set_device(args.device)
    except Exception as e:
        print(f"vmm_bench: cannot start: {type(e).__name__}: {e}", file=sys.stderr)
        res["error"] = f"{type(e).__name__}: {e}"
        args.out.write_text(json.dumps(res, indent=1))
        return 1
    sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("info", lambda: section_info(args.device)),
        ("view", lambda: section_view(args.device)),
        ("page", lambda: section_page(args.device, pages)),
        ("group", lambda: section_group(args.device, groups)),
        ("physical", lambda: section_physical(args.device, args.physical_mib)),
        ("hidden", lambda: section_hidden(args.device, args.matmul, iters, groups)),
        ("gather", lambda: section_gather(args.device, 1024 if args.quick else args.gather_mib)),
    ]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - {name for name, _ in sections}
    if unknown:
        ap.error(f"--only: unknown {sorted(unknown)}; pick from "
                 f"{', '.join(name for name, _ in sections)}")
    for name, fn in sections:
        if only and name not in only:
            continue
        s0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # record and go on: one broken section must not lose the rest
            traceback.print_exc()
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        res[name]["section_s"] = round(time.perf_counter() - s0, 3)
        print(f"-- {name} done in {res[name]['section_s']:.1f} s", flush=True)
        args.out.write_text(json.dumps(res, indent=1))  # partial results survive a hang
    res["elapsed_s"] = time.perf_counter() - t0
    args.out.write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
