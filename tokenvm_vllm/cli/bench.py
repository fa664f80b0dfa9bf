"""``tokenvm bench``: prefix-reuse benchmark without and with TokenVM, plus a plot.

Each engine configuration runs in its own process (``tokenvm_vllm.bench.prefix_reuse``);
matplotlib is imported only to draw the plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

SOURCES = (("computed", "local_compute"), ("GPU cache", "local_cache_hit"),
           ("TokenVM", "external_kv_transfer"))


def _tokens_by_source(counters: Mapping[str, float]) -> dict[str, float]:
    return {label: counters.get(f"vllm:prompt_tokens_by_source[{source}]", 0.0)
            for label, source in SOURCES}


def bench_summary(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``results.json`` body from per-configuration results of ``run_in_subprocess``.

    The first configuration is the baseline; ``speedup_*`` are baseline time / this time.
    """
    names = list(results)
    base = results[names[0]]
    base_outputs = base["outputs"]
    configs: dict[str, Any] = {}
    for name, result in results.items():
        pass_s = result["pass_s"]
        same = sum(result["outputs"].get(k) == v for k, v in base_outputs.items())
        configs[name] = {
            "settings": result["settings"],
            "startup_s": result["startup_s"],
            "pass_s": pass_s,
            "total_s": sum(pass_s),
            "speedup_pass2": base["pass_s"][1] / pass_s[1] if pass_s[1] else None,
            "speedup_total": sum(base["pass_s"]) / sum(pass_s) if sum(pass_s) else None,
            "tokens_by_source": _tokens_by_source(result["counters"]),
            "counters": result["counters"],
            "outputs_equal_to_baseline": f"{same}/{len(base_outputs)}",
        }
    return {"baseline": names[0], "workload": base["workload"], "configs": configs}


def bench_table(summary: Mapping[str, Any]) -> str:
    """The short text table ``tokenvm bench`` prints."""
    head = (f"{'configuration':<14}{'pass 1 s':>10}{'pass 2 s':>10}{'pass-2 x':>10}"
            f"{'total x':>9}" + "".join(f"{label + ' tok':>15}" for label, _ in SOURCES)
            + f"{'outputs':>10}")
    lines = [head]
    for name, c in summary["configs"].items():
        tokens = "".join(f"{c['tokens_by_source'][label]:>15.0f}" for label, _ in SOURCES)
        lines.append(f"{name:<14}{c['pass_s'][0]:>10.2f}{c['pass_s'][1]:>10.2f}"
                     f"{c['speedup_pass2']:>9.2f}x{c['speedup_total']:>8.2f}x{tokens}"
                     f"{c['outputs_equal_to_baseline']:>10}")
    lines.append(f"(x = speed-up vs {summary['baseline']}: its time / this time; outputs = greedy "
                 f"outputs equal to {summary['baseline']})")
    return "\n".join(lines)


def bench_plot(summary: Mapping[str, Any], png: Path) -> None:
    """Two panels: pass-1/pass-2 seconds per configuration, prompt tokens by source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["configs"])
    configs = [summary["configs"][n] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    xs = range(len(names))
    passes = ((-width / 2, 0, "pass 1 (cold)"), (width / 2, 1, "pass 2 (revisit)"))
    for offset, idx, label in passes:
        bars = left.bar([x + offset for x in xs], [c["pass_s"][idx] for c in configs], width,
                        label=label)
        left.bar_label(bars, fmt="%.1f", fontsize=8)
    left.set_xticks(list(xs), names)
    left.set_ylabel("seconds")
    left.set_title("time per pass")
    left.set_ylim(0, 1.25 * max(max(c["pass_s"]) for c in configs))
    left.legend(ncol=2, loc="upper center")
    bottom = [0.0] * len(names)
    for label, _ in SOURCES:
        values = [c["tokens_by_source"][label] for c in configs]
        right.bar(list(xs), values, 0.6, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set_xticks(list(xs), names)
    right.set_ylabel("prompt tokens (both passes)")
    right.set_title("prompt tokens by source")
    right.set_ylim(0, 1.25 * max(bottom))
    right.legend(ncol=3, loc="upper center")
    workload = summary["workload"]
    fig.suptitle(f"prefix reuse: {workload['documents']} documents x {workload['questions']} "
                 f"questions, {workload['prefix_blocks']}-block prefixes")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the workload per configuration, write results.json and bench.png, print the table."""
    from tokenvm_vllm.bench.prefix_reuse import EngineSettings, Workload, run_in_subprocess

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from tokenvm_vllm.tiny_llama import write_tiny_llama

        model = str(write_tiny_llama(out / "tiny-llama"))
        print(f"model: tiny Llama written to {model} (random std-0.02 weights)", flush=True)
    dtype = args.dtype or ("float32" if args.model is None else "auto")
    workload = Workload(documents=args.documents, questions=args.questions,
                        prefix_blocks=args.prefix_blocks, suffix_tokens=args.suffix_tokens,
                        max_tokens=args.max_tokens, batch_size=args.batch_size)
    base = EngineSettings(model=model, block_size=args.block_size,
                          num_gpu_blocks=args.num_gpu_blocks, dtype=dtype,
                          max_model_len=args.max_model_len)
    extra = {"policy": args.policy} if args.policy else {}
    configs = {"no offload": base,
               "TokenVM": replace(base, connector="tokenvm", host_bytes=args.host_bytes,
                                  extra_config=extra)}
    requests = workload.documents * workload.questions
    print(f"workload: {requests} requests x 2 passes, {workload.prefix_blocks * args.block_size}"
          f"-token shared prefixes, GPU cache {args.num_gpu_blocks} blocks of "
          f"{args.block_size}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for step, (name, settings) in enumerate(configs.items(), start=1):
        stem = out / name.replace(" ", "_")
        print(f"[{step}/{len(configs)}] {name}: running in its own process "
              f"(log {stem}.log) ...", flush=True)
        start = time.perf_counter()
        try:
            result = run_in_subprocess(settings, workload, stem.with_suffix(".json"),
                                       timeout=args.timeout)
        except Exception as exc:  # report which configuration failed
            print(f"tokenvm bench: error: {name}: {exc}", file=sys.stderr)
            return 1
        results[name] = result
        for idx, seconds in enumerate(result["pass_s"], start=1):
            print(f"      pass {idx}/{len(result['pass_s'])}: {requests} requests in "
                  f"{seconds:.2f} s", flush=True)
        print(f"      done in {time.perf_counter() - start:.0f} s (engine start-up "
              f"{result['startup_s']:.0f} s)", flush=True)
    summary = bench_summary(results)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    bench_plot(summary, out / "bench.png")
    print()
    print(bench_table(summary))
    print(f"\nwrote {out / 'results.json'} and {out / 'bench.png'}")
    return 0
