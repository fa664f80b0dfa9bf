"""Copy-engine benchmark (GPU): TokenVM's block copies against the PCIe peak and vLLM's DMA.

Llama-3.1-8B-shaped cache, 32 layers in bf16, in the per-layer layout vLLM 0.26 hands a KV
connector on an H100: logical (blocks, 8 heads, 16 tokens, 2 x 128) stored tokens-before-heads,
so one block of one layer is a contiguous 64 KiB and a block of all layers is 2 MiB. For
batches from 1 block to thousands, measured in the same run on the same machine (CUDA
events, warm-up first, median of repeats):

- ``tokenvm``: ``CudaCopyEngine`` with ``copy_path="uva"`` (one Triton launch per direction,
  UVA into pinned host slots) GPU->host, host->GPU, and both at once, with its default program
  caps (8 GPU->host, 16 host->GPU: they leave SMs to the forward); ``tokenvm x2 programs``:
  twice those caps; ``tokenvm layerwise h2d``: a layer-wise load (one launch and one event per
  layer); ``tokenvm staged``: ``copy_path="staged"`` (on-device gather into a GPU staging
  buffer, then DMA of whole slot rows; the default); ``tokenvm dma``: ``copy_path="dma"`` (one
  batched DMA of every block's per-layer chunks, no kernel: what native does on V2);
- ``memcpy peak``: one contiguous pinned ``copy_`` of the same bytes (the PCIe ceiling);
- ``vllm dma 64K``: vLLM's ``swap_blocks_batch`` (cuMemcpyBatchAsync) over the same 64 KiB blocks;
- ``vllm dma 2M``: the same with vLLM native offloading's cross-layer layout (one 2 MiB chunk per
  block), its best case.

Then *interference*: what a copy running beside the model costs the model. A decode-like GEMM
loop (32 x 4096 x 14336 bf16, memory-bound) and a prefill-like one (4096 x 4096 x 14336) run
on the compute stream alone and while each path moves 1024 blocks on its own stream; the table
gives the compute's slowdown (1.00 = none). This is the number that matters under serving load.

    python -m tokenvm_vllm.bench.copy_bench [--blocks 2048] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

LAYERS, BLOCK_TOKENS, KV_HEADS, HEAD = 32, 16, 8, 128
BATCHES = (1, 4, 16, 64, 256, 1024)


def time_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of fn on the GPU, in ms (fn may use several streams)."""
    fn()
    torch.cuda.synchronize()
    times: list[float] = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        torch.cuda.synchronize()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_cases(
    run_jobs: Callable[..., None], dma: Callable[..., None], ids: list[int], slots: list[int],
    ids2: list[int], slots2: list[int], host_flat: torch.Tensor, gpu_flat: torch.Tensor,
) -> dict[str, Callable[[], object]]:
    """One batch's measurements, each a thunk (named ``<method> <direction>``)."""
    return {
        "tokenvm d2h": lambda: run_jobs(("store", ids, slots)),
        "tokenvm h2d": lambda: run_jobs(("load", ids, slots)),
        "tokenvm both": lambda: run_jobs(("store", ids, slots), ("load", ids2, slots2)),
        "tokenvm layerwise h2d": lambda: run_jobs(("load_layers", ids, slots)),
        "tokenvm staged d2h": lambda: run_jobs(("store", ids, slots), via="staged"),
        "tokenvm staged h2d": lambda: run_jobs(("load", ids, slots), via="staged"),
        "tokenvm staged both": lambda: run_jobs(("store", ids, slots), ("load", ids2, slots2),
                                                via="staged"),
        "tokenvm dma d2h": lambda: run_jobs(("store", ids, slots), via="dma"),
        "tokenvm dma h2d": lambda: run_jobs(("load", ids, slots), via="dma"),
        "tokenvm dma both": lambda: run_jobs(("store", ids, slots), ("load", ids2, slots2),
                                             via="dma"),
        "tokenvm x2 programs d2h": lambda: run_jobs(("store", ids, slots), via="wide"),
        "tokenvm x2 programs h2d": lambda: run_jobs(("load", ids, slots), via="wide"),
        "memcpy d2h": lambda: host_flat.copy_(gpu_flat, non_blocking=True),
        "memcpy h2d": lambda: gpu_flat.copy_(host_flat, non_blocking=True),
        "vllm dma 64K d2h": lambda: dma(ids, slots, True, False),
        "vllm dma 64K h2d": lambda: dma(ids, slots, False, False),
        "vllm dma 2M d2h": lambda: dma(ids, slots, True, True),
        "vllm dma 2M h2d": lambda: dma(ids, slots, False, True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2048, help="GPU blocks (and host slots)")
    parser.add_argument("--out", default="", help="write results JSON here")
    args = parser.parse_args()

    from tokenvm_vllm.transfer.cuda_copy_engine import (
        LOAD_PROGRAMS,
        STORE_PROGRAMS,
        CudaCopyEngine,
    )
    from tokenvm_vllm.transfer.host_pool import HostPool
    from tokenvm_vllm.transfer.layout import KVLayout

    n = args.blocks
    caches = {f"layer.{i}": torch.randn(n, BLOCK_TOKENS, KV_HEADS, 2 * HEAD, device="cuda")
              .to(torch.bfloat16).permute(0, 2, 1, 3) for i in range(LAYERS)}
    block_bytes = 2 * BLOCK_TOKENS * KV_HEADS * HEAD * 2 * LAYERS
    layout = KVLayout.from_kv_caches(caches, n, block_bytes)
    pool = HostPool(n, block_bytes, pin=True)
    engine = CudaCopyEngine(layout, caches, pool, path="uva")
    staged_engine = CudaCopyEngine(layout, caches, pool, path="staged")
    wide_engine = CudaCopyEngine(layout, caches, pool, store_programs=2 * STORE_PROGRAMS,
                                 load_programs=2 * LOAD_PROGRAMS, path="uva")
    engines = {"uva": engine, "staged": staged_engine, "wide": wide_engine,
               "dma": CudaCopyEngine(layout, caches, pool, path="dma")}
    print(f"host pool {n} x {block_bytes >> 20} MiB pinned in {pool.alloc_seconds:.2f} s",
          flush=True)

    def submit(*jobs: tuple[str, list[int], list[int]], via: str = "uva") -> CudaCopyEngine:
        chosen = engines[via]
        for job_id, (method, ids, slots) in enumerate(jobs):
            getattr(chosen, method)(job_id, ids, slots)
        return chosen

    def run_jobs(*jobs: tuple[str, list[int], list[int]], via: str = "uva") -> None:
        chosen = submit(*jobs, via=via)
        torch.cuda.synchronize()
        chosen.poll()

    rng = torch.Generator().manual_seed(0)
    # vLLM's DMA baselines: pointer lists over the same chunks / a cross-layer tensor
    from vllm import _custom_ops as ops

    cross = torch.empty(n, block_bytes, dtype=torch.uint8, device="cuda")
    chunk = block_bytes // LAYERS

    def dma(ids: list[int], slots: list[int], to_host: bool, cross_layer: bool) -> None:
        gpu, host = [], []
        for b, s in zip(ids, slots, strict=True):
            if cross_layer:
                gpu.append(cross[b].data_ptr())
                host.append(pool.buffer[s].data_ptr())
                continue
            for i, kv in enumerate(caches.values()):
                gpu.append(kv[b].data_ptr())
                host.append(pool.buffer[s].data_ptr() + i * chunk)
        size = block_bytes if cross_layer else chunk
        src, dst = (gpu, host) if to_host else (host, gpu)
        ops.swap_blocks_batch(torch.tensor(src, dtype=torch.int64),
                              torch.tensor(dst, dtype=torch.int64),
                              torch.full((len(src),), size, dtype=torch.int64))

    results = []
    for batch in BATCHES:
        ids = torch.randperm(n, generator=rng)[:batch].tolist()
        slots = torch.randperm(n, generator=rng)[:batch].tolist()
        ids2 = torch.randperm(n, generator=rng)[:batch].tolist()
        slots2 = torch.randperm(n, generator=rng)[:batch].tolist()
        nbytes = batch * block_bytes
        host_flat = pool.buffer[:batch].view(-1)
        gpu_flat = cross[:batch].view(-1)
        row: dict[str, float] = {"blocks": batch, "MiB": nbytes >> 20}
        cases = make_cases(run_jobs, dma, ids, slots, ids2, slots2, host_flat, gpu_flat)
        for name, fn in cases.items():
            ms = time_ms(fn)
            moved = nbytes * (2 if name.endswith("both") else 1)
            row[name] = round(moved / ms / 1e6, 2)  # GB/s
        results.append(row)
        print(json.dumps(row), flush=True)
    names = [k for k in results[0] if k not in ("blocks", "MiB")]
    print(f"\nGB/s (GPU: {torch.cuda.get_device_name()})")
    print(f"{'blocks':>7}" + "".join(f"{k:>18}" for k in names))
    for row in results:
        print(f"{row['blocks']:>7}" + "".join(f"{row[k]:>18.1f}" for k in names))
    def drain() -> None:
        for chosen in engines.values():
            chosen.poll()

    slowdown = interference(submit, dma, n, drain)
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(),
                                              "rows": results, "interference": slowdown},
                                             indent=1))


def interference(
    submit: Callable[..., object], dma: Callable[..., None], n: int, drain: Callable[[], None]
) -> dict[str, dict[str, float]]:
    """Slowdown of GEMM loops on the compute stream while a 1024-block copy runs beside them."""
    batch = min(1024, n)
    rng = torch.Generator().manual_seed(1)
    ids = torch.randperm(n, generator=rng)[:batch].tolist()
    slots = torch.randperm(n, generator=rng)[:batch].tolist()
    weight = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)
    inputs = {"decode GEMM": torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16),
              "prefill GEMM": torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)}
    side = torch.cuda.Stream()
    copies: dict[str, Callable[[], object]] = {
        "none": lambda: None,
        "uva d2h": lambda: submit(("store", ids, slots)),
        "uva h2d": lambda: submit(("load", ids, slots)),
        "staged d2h": lambda: submit(("store", ids, slots), via="staged"),
        "staged h2d": lambda: submit(("load", ids, slots), via="staged"),
        "dma d2h": lambda: submit(("store", ids, slots), via="dma"),
        "dma h2d": lambda: submit(("load", ids, slots), via="dma"),
        "vllm dma 64K d2h": lambda: dma(ids, slots, True, False),
    }
    table: dict[str, dict[str, float]] = {}
    for label, x in inputs.items():
        repeats = 400 if x.shape[0] == 32 else 20

        def compute(x: torch.Tensor = x, repeats: int = repeats) -> None:
            for _ in range(repeats):
                torch.mm(x, weight)

        times: dict[str, float] = {}
        for name, copy in copies.items():
            samples = []
            for _ in range(3):
                torch.cuda.synchronize()
                with torch.cuda.stream(side):
                    copy()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                compute()
                end.record()
                torch.cuda.synchronize()
                drain()
                samples.append(start.elapsed_time(end))
            times[name] = statistics.median(samples)
        table[label] = {name: round(ms / times["none"], 3) for name, ms in times.items()}
        table[label]["alone_ms"] = round(times["none"], 3)
    print("\ninterference: compute time beside a 1024-block copy / alone")
    for label, row in table.items():
        print(f"{label:>14}: " + "  ".join(f"{k} {v}" for k, v in row.items()))
    return table


if __name__ == "__main__":
    main()
