"""Demo: vLLM on CPU with a tiny generated Llama, with and without TokenVM.

The GPU (here: CPU) KV cache is kept small, so vLLM evicts the shared document prefixes between
the two passes of the prefix-reuse workload. Without TokenVM the second pass recomputes them;
with TokenVM they come back from the host tier. Prints hits and times, and checks that the
greedy outputs are identical token for token.

    python examples/demo.py [--out out/demo]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from tokenvm_vllm.bench.prefix_reuse import EngineSettings, Workload, run_in_subprocess
from tokenvm_vllm.tiny_llama import write_tiny_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/demo", help="working directory (model, logs)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/3] writing a tiny Llama (random std-0.02 weights) to {out / 'tiny-llama'}")
    model = str(write_tiny_llama(out / "tiny-llama"))
    workload = Workload(documents=16, questions=4)
    base = EngineSettings(model=model, num_gpu_blocks=96)
    results = {}
    for step, (name, settings) in enumerate(
        [("no offload", base), ("TokenVM", replace(base, connector="tokenvm"))], start=2):
        start = time.perf_counter()
        stem = out / name.replace(" ", "_")
        print(f"[{step}/3] running vLLM {name} (own process, log: {stem}.log) ...", flush=True)
        results[name] = run_in_subprocess(settings, workload, stem.with_suffix(".json"))
        print(f"      done in {time.perf_counter() - start:.0f} s", flush=True)
    base_out, tvm_out = results["no offload"]["outputs"], results["TokenVM"]["outputs"]
    same = sum(base_out[k] == tvm_out[k] for k in base_out)
    print()
    print(f"{'':22}{'no offload':>12}{'TokenVM':>12}")
    for label, key in [("pass 1 (cold) s", 0), ("pass 2 (revisit) s", 1)]:
        print(f"{label:22}" + "".join(f"{results[n]['pass_s'][key]:12.2f}" for n in results))
    source = "vllm:prompt_tokens_by_source"
    for label, key in [("prompt tokens computed", f"{source}[local_compute]"),
                       ("tokens from GPU cache", f"{source}[local_cache_hit]"),
                       ("tokens from TokenVM", f"{source}[external_kv_transfer]")]:
        row = "".join(f"{results[n]['counters'].get(key, 0):12.0f}" for n in results)
        print(f"{label:22}{row}")
    counters = results["TokenVM"]["counters"]
    print(f"TokenVM blocks stored {counters.get('tokenvm:stored_blocks', 0):.0f}, loaded "
          f"{counters.get('tokenvm:loaded_blocks', 0):.0f}, host evictions "
          f"{counters.get('tokenvm:host_evicted_blocks', 0):.0f}")
    total = sum(results["no offload"]["pass_s"]) / sum(results["TokenVM"]["pass_s"])
    print(f"greedy outputs identical: {same}/{len(base_out)} requests; "
          f"TokenVM speed-up over both passes: {total:.2f}x")
    if same != len(base_out):
        raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
