"""End-to-end revisit benchmark: long prompts evicted from the GPU cache, then revisited.

A Llama-3.1-8B-shaped model with dummy weights (timing only), a GPU KV cache capped well below
the working set, ``documents`` prompts of ``prompt_tokens`` tokens. Per engine configuration, in
its own process, all in one run of ``--all``:

- first pass: every document once (max_tokens=1), one at a time: the cost of storing;
- revisit, one at a time: each document again with a short new suffix (max_tokens=1), oldest
  first, so its prefix has been evicted from the GPU cache: latency median and p90;
- revisit in batches of ``batch``: wall time per batch;
- tokens served per tier (vLLM's ``prompt_tokens_by_source``), and a hash of all greedy outputs.

    python -m tokenvm_vllm.bench.revisit_bench --all --out DIR     # none, native, tokenvm
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tokenvm_vllm.bench.stats import percentile

CONFIGS = ("none", "gpu_hit", "native", "tokenvm", "tokenvm_wt", "tokenvm_layerwise",
           "tokenvm_disk", "native_fs")
"""none: no offload; gpu_hit: no offload, GPU cache big enough to keep every document (the floor:
a revisit that copies nothing); native: vLLM's CPU offloading (kv_offloading_size); tokenvm: host
tier with the defaults (write-back, async loads); tokenvm_wt: write-through; tokenvm_layerwise:
layer-wise loads; tokenvm_disk: small host tier + disk tier; native_fs: vLLM's tiering (small
CPU tier + fs tier)."""


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from tokenvm_vllm.bench.prefix_reuse import _counters

    kwargs: dict[str, Any] = {}
    disk = Path(args.disk_dir) / args.config
    gpu_blocks = args.gpu_blocks
    if args.config == "gpu_hit":  # every document and its revisit suffixes, with room to spare
        per_document = -(-(args.prompt_tokens + 96) // args.block_size) + 4
        gpu_blocks = max(gpu_blocks, args.documents * per_document + 64)
    if args.config == "native":
        kwargs["kv_offloading_size"] = args.host_gib
    elif args.config == "native_fs":
        kwargs["kv_transfer_config"] = {
            "kv_connector": "OffloadingConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "spec_name": "TieringOffloadingSpec",
                "cpu_bytes_to_use": args.disk_host_gib * 2**30,
                "secondary_tiers": [{"type": "fs", "root_dir": str(disk)}]}}
    elif args.config.startswith("tokenvm"):
        extra: dict[str, Any] = {"host_bytes": f"{args.host_gib}GiB", "trace": args.trace}
        if args.config == "tokenvm_wt":
            extra["write_mode"] = "write_through"
        if args.config == "tokenvm_layerwise":
            extra["load_mode"] = "layerwise"
        if args.config == "tokenvm_disk":
            extra |= {"host_bytes": f"{args.disk_host_gib}GiB", "disk_path": str(disk),
                      "disk_bytes": f"{args.disk_gib}GiB"}
        kwargs["kv_transfer_config"] = {
            "kv_connector": "TokenVM", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra}
    if args.cudagraphs:
        kwargs["compilation_config"] = {"cudagraph_capture_sizes": [1, 2, 4, 8]}
    start = time.perf_counter()
    llm = LLM(model=args.model, load_format="dummy", dtype="bfloat16", block_size=args.block_size,
              num_gpu_blocks_override=gpu_blocks, max_model_len=args.prompt_tokens + 256,
              max_num_batched_tokens=args.prompt_tokens + 256, max_num_seqs=args.batch,
              enforce_eager=not args.cudagraphs, enable_prefix_caching=True,
              disable_log_stats=False, gpu_memory_utilization=0.85, seed=0, **kwargs)
    startup = time.perf_counter() - start
    rng = random.Random(0)
    docs = [[rng.randrange(3, 1000) for _ in range(args.prompt_tokens)]
            for _ in range(args.documents)]
    params = SamplingParams(temperature=0.0, max_tokens=1)
    outputs: list[list[int]] = []

    def generate(prompts: list[list[int]]) -> float:
        if args.trace:  # same clock as the engine's trace lines (time.monotonic is system-wide)
            print(f"TokenVM trace {time.monotonic():.6f} generate-start n={len(prompts)}")
        t = time.perf_counter()
        results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        outputs.extend(list(r.outputs[0].token_ids) for r in results)
        elapsed = time.perf_counter() - t
        if args.trace:
            print(f"TokenVM trace {time.monotonic():.6f} generate-end", flush=True)
        return elapsed

    generate([[5] * 64])  # warm-up
    outputs.clear()
    first_pass = sum(generate([doc]) for doc in docs)
    latencies = [generate([doc + [rng.randrange(3, 1000) for _ in range(32)]]) for doc in docs]
    batch_times = []
    for i in range(0, len(docs), args.batch):
        batch = [doc + [rng.randrange(3, 1000) for _ in range(32)]
                 for doc in docs[i:i + args.batch]]
        batch_times.append(generate(batch))
    digest = hashlib.sha256(json.dumps(outputs).encode()).hexdigest()[:16]
    return {"config": args.config, "startup_s": startup, "first_pass_s": first_pass,
            "revisit_ms": [x * 1000 for x in latencies],
            "revisit_median_ms": statistics.median(latencies) * 1000,
            "revisit_p90_ms": percentile(latencies, 0.9) * 1000,
            "batch_revisit_s": batch_times, "output_hash": digest, "counters": _counters(llm)}


TIMELINE_EVENTS = ("lookup", "load-submitted", "load-polled", "load-finished", "generate-end")


def revisit_timeline(log_text: str) -> dict[str, float]:
    """Median ms after ``generate`` was called, per event, over the single revisits in a
    ``--trace`` log (those whose lookup hit a prefix), plus ``copy_device_ms``: the load's time
    on the GPU. Every process stamps ``time.monotonic()``, one clock for all of them."""
    import re

    events = [(float(m.group(1)), m.group(2), m.group(3)) for m in re.finditer(
        r"TokenVM trace ([\d.]+) (\S+)([^\n]*)", log_text)]
    samples: dict[str, list[float]] = {}
    window: list[tuple[float, str, str]] | None = None
    for event in events:
        if event[1] == "generate-start":
            window = [event] if "n=1" in event[2] else None
            continue
        if window is None:
            continue
        window.append(event)
        if event[1] != "generate-end":
            continue
        if any(name == "lookup" and "hit_blocks=0" not in rest for _, name, rest in window):
            start = window[0][0]
            seen: dict[str, float] = {}
            for stamp, name, rest in window:
                if name in TIMELINE_EVENTS and name not in seen:
                    seen[name] = (stamp - start) * 1000
                if name == "load-polled" and "copy_device_ms" not in seen:
                    seen["copy_device_ms"] = float(rest.split("device_ms=")[1])
            for name, value in seen.items():
                samples.setdefault(name, []).append(value)
        window = None
    return {name: statistics.median(values) for name, values in samples.items()}


def run_all(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    shutil.rmtree(args.disk_dir, ignore_errors=True)  # a cold disk tier for every run
    for i, config in enumerate(args.configs.split(","), 1):
        print(f"[{i}/{len(args.configs.split(','))}] {config} ...", flush=True)
        cmd = [sys.executable, "-m", "tokenvm_vllm.bench.revisit_bench", "--config", config,
               "--json", str(out / f"revisit_{config}.json")] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("model", "documents", "prompt_tokens", "block_size", "gpu_blocks",
                     "host_gib", "batch",
                     "disk_dir", "disk_gib", "disk_host_gib")]
        cmd += [f"--{flag}" for flag in ("cudagraphs", "trace") if getattr(args, flag)]
        with open(out / f"revisit_{config}.log", "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        if proc.returncode != 0:
            print(f"  failed: see {out / f'revisit_{config}.log'}", flush=True)
            continue
        results[config] = json.loads((out / f"revisit_{config}.json").read_text())
        r = results[config]
        if args.trace:
            r["timeline_ms"] = revisit_timeline((out / f"revisit_{config}.log").read_text())
        print(f"  startup {r['startup_s']:.0f} s, first pass {r['first_pass_s']:.2f} s, revisit "
              f"median {r['revisit_median_ms']:.1f} ms", flush=True)
    (out / "revisit_results.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict[str, Any]) -> None:
    # First-pass baseline: no offload (gpu_hit runs the same first pass with a bigger cache)
    base = results.get("none") or results.get("gpu_hit")
    src = "vllm:prompt_tokens_by_source"
    print(f"\n{'config':>17} {'first pass s':>12} {'x none':>7} {'revisit p50 ms':>15} "
          f"{'p90 ms':>8} {'x native':>8} {'batch s':>8} {'computed':>9} {'gpu hit':>8} "
          f"{'loaded':>8} {'hash':>17}")
    native = results.get("native")
    for name, r in results.items():
        c = r["counters"]
        vs_none = r["first_pass_s"] / base["first_pass_s"] if base else float("nan")
        vs_native = (r["revisit_median_ms"] / native["revisit_median_ms"]
                     if native else float("nan"))
        print(f"{name:>17} {r['first_pass_s']:12.2f} {vs_none:7.3f} "
              f"{r['revisit_median_ms']:15.1f} {r['revisit_p90_ms']:8.1f} {vs_native:8.2f} "
              f"{sum(r['batch_revisit_s']):8.2f} {c.get(src + '[local_compute]', 0):9.0f} "
              f"{c.get(src + '[local_cache_hit]', 0):8.0f} "
              f"{c.get(src + '[external_kv_transfer]', 0):8.0f} {r['output_hash']:>17}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model dir (config + tokenizer)")
    parser.add_argument("--all", action="store_true", help="run every config, each in a process")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--config", choices=CONFIGS)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=16, help="vLLM's GPU default")
    parser.add_argument("--gpu-blocks", type=int, default=2048, help="GPU KV cache cap (blocks)")
    parser.add_argument("--host-gib", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--disk-dir", default="/tmp/tokenvm-bench-disk")
    parser.add_argument("--disk-gib", type=int, default=16)
    parser.add_argument("--disk-host-gib", type=int, default=2,
                        help="host tier of the disk configurations (below the working set)")
    parser.add_argument("--cudagraphs", action="store_true")
    parser.add_argument("--trace", action="store_true", help="TokenVM timeline log lines")
    parser.add_argument("--out", default="out/revisit")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.all:
        run_all(args)
        return
    result = run_config(args)
    Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
