"""GPU token-exact check of a hybrid model on vLLM 0.26 (issue #14 item 2): greedy outputs with
TokenVM == without, on a model with alternating sliding-window and full-attention layers.

The model is ``token_exact.py``'s small Llama (std-0.02 weights generated on the GPU) with
``layer_types`` alternating ``sliding_attention`` / ``full_attention`` and a 128-token window
(``tokenvm_vllm/tiny_hybrid.py``): vLLM's hybrid KV cache manager (kept on by TokenVM's
``SupportsHMA``) gives it two KV cache groups. The reference is vLLM without a connector and a
GPU cache large enough to keep every prefix (as in ``token_exact.py``: recomputing is not
bit-identical in bf16); requests run one at a time. ``tokenvm_corrupt`` must differ.

    python ci/gpu/hybrid_exact.py --out DIR [--configs tokenvm,tokenvm_layerwise]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from tokenvm_vllm.bench.prefix_reuse import (
    EngineSettings,
    Workload,
    add_gpu_share_args,
    run_in_subprocess,
)
from tokenvm_vllm.tiny_hybrid import write_tiny_hybrid
from tokenvm_vllm.tiny_llama import TinyLlamaShape

SHAPE = TinyLlamaShape(vocab_words=4093, hidden_size=1024, intermediate_size=2816, num_layers=8,
                       num_heads=16, num_kv_heads=8)
WINDOW = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", default="", help="comma-separated subset")
    add_gpu_share_args(parser)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(write_tiny_hybrid(out / "small-hybrid", sliding_window=WINDOW, shape=SHAPE,
                                  device="cuda"))
    workload = Workload(documents=12, questions=3, prefix_blocks=16, suffix_tokens=40,
                        max_tokens=16, batch_size=1)
    base = EngineSettings(model=model, block_size=16, num_gpu_blocks=160, max_num_seqs=1,
                          max_model_len=1024, dtype="bfloat16",
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                          host_bytes="2GiB")
    configs = {"reference": replace(base, num_gpu_blocks=4096),
               "tokenvm": replace(base, connector="tokenvm"),
               "tokenvm_layerwise": replace(base, connector="tokenvm",
                                            extra_config={"load_mode": "layerwise"}),
               "tokenvm_corrupt": replace(base, connector="tokenvm", extra_config={
                   "debug_corrupt_loads": True, "testing": True})}
    if args.configs:
        wanted = set(args.configs.split(",")) | {"reference"}
        configs = {n: c for n, c in configs.items() if n in wanted}
    results = {}
    for name, settings in configs.items():
        print(f"running {name} ...", flush=True)
        try:
            results[name] = run_in_subprocess(settings, workload, out / f"hybrid_{name}.json")
        except RuntimeError as err:
            print(f"  {name} failed: {str(err)[-1500:]}", flush=True)
    summary = {}
    for name, r in results.items():
        if "reference" not in results:
            break
        base_out = results["reference"]["outputs"]
        c = r["counters"]
        log = (out / f"hybrid_{name}.log").read_text()
        summary[name] = {
            "requests": len(r["outputs"]),
            "differing": sum(r["outputs"][k] != base_out[k] for k in base_out),
            "loaded_tokens": c.get("vllm:prompt_tokens_by_source[external_kv_transfer]", 0),
            "tokenvm_loaded_blocks": c.get("tokenvm:loaded_blocks", 0),
            "tokenvm_host_hit_blocks": c.get("tokenvm:host_hit_blocks", 0),
            "two_groups": "KV cache groups 0:" in log,
            "runner": "V2" if "Using V2 Model Runner" in log else "V1",
            "pass_s": [round(x, 2) for x in r["pass_s"]],
        }
        print(name, json.dumps(summary[name]), flush=True)
    (out / "hybrid_exact.json").write_text(json.dumps(summary, indent=1))
    must_match = [n for n in configs if n.startswith("tokenvm") and n != "tokenvm_corrupt"]
    ok = (all(name in summary and summary[name]["differing"] == 0
              and summary[name]["loaded_tokens"] > 0 and summary[name]["two_groups"]
              for name in must_match)
          and ("tokenvm_corrupt" not in configs
               or summary.get("tokenvm_corrupt", {}).get("differing", 0) > 0))
    print("HYBRID-TOKEN-EXACT", "PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
