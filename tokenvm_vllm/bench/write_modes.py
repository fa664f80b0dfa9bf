"""Write-through vs write-back, measured on the prefix-reuse workload (same machine, same run).

For each mode: bytes copied GPU -> host (the PCIe cost), host-tier hit rate (blocks found in
host / blocks looked up), tokens served from TokenVM, pass times, and whether the greedy outputs
equal those without TokenVM. Each engine runs in its own process.

    python -m tokenvm_vllm.bench.write_modes [--out out/write_modes] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from tokenvm_vllm.bench.prefix_reuse import EngineSettings, Workload, run_in_subprocess
from tokenvm_vllm.tiny_llama import write_tiny_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/write_modes")
    parser.add_argument("--model", default="", help="model dir (default: a generated tiny Llama)")
    parser.add_argument("--num-gpu-blocks", type=int, default=96)
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(write_tiny_llama(out / "tiny-llama"))
    workload = Workload(documents=16, questions=4)
    base = EngineSettings(model=model, num_gpu_blocks=args.num_gpu_blocks,
                          block_size=args.block_size)
    configs = {
        "no offload": base,
        "write_through": replace(base, connector="tokenvm",
                                 extra_config={"write_mode": "write_through"}),
        "write_back": replace(base, connector="tokenvm",
                              extra_config={"write_mode": "write_back"}),
    }
    results = {}
    for i, (name, settings) in enumerate(configs.items(), 1):
        print(f"[{i}/{len(configs)}] {name} ...", flush=True)
        results[name] = run_in_subprocess(settings, workload,
                                          out / f"{name.replace(' ', '_')}.json")
    reference = results["no offload"]["outputs"]
    rows = {}
    for name, r in results.items():
        c = r["counters"]
        lookups = c.get("tokenvm:lookup_blocks", 0)
        rows[name] = {
            "store_MiB": c.get("tokenvm:store_bytes", 0) / 2**20,
            "host_hit_rate": c.get("tokenvm:host_hit_blocks", 0) / lookups if lookups else 0.0,
            "tokens_from_tokenvm": c.get("vllm:prompt_tokens_by_source[external_kv_transfer]", 0),
            "pass1_s": r["pass_s"][0], "pass2_s": r["pass_s"][1],
            "outputs_equal": r["outputs"] == reference,
        }
    (out / "write_modes.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'mode':>14} {'GPU->host MiB':>14} {'host hit rate':>14} {'TokenVM tokens':>15} "
          f"{'pass 1 s':>9} {'pass 2 s':>9} {'exact':>6}")
    for name, row in rows.items():
        print(f"{name:>14} {row['store_MiB']:14.1f} {row['host_hit_rate']:14.1%} "
              f"{row['tokens_from_tokenvm']:15.0f} {row['pass1_s']:9.2f} {row['pass2_s']:9.2f} "
              f"{row['outputs_equal']!s:>6}")


if __name__ == "__main__":
    main()
