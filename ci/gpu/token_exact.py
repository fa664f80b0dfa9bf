"""GPU token-exact check on vLLM 0.26: greedy outputs with TokenVM == without (and == native).

Configurations: TokenVM with async loads (the default) and with layer-wise loads, eager and with
CUDA graphs (layer-wise loads make vLLM's graphs PIECEWISE, so the per-layer waits run between
graph pieces), vLLM native offloading, and a corrupted TokenVM run that must differ.

The model is a small Llama with random weights initialised like ``transformers`` (std 0.02),
generated on the GPU: dummy weights would make outputs ignore earlier context, so a wrong KV
block could pass. Runs the prefix-reuse workload (shared prefixes evicted from a small GPU
cache, then revisited) once per configuration, each in its own process.

The reference is vLLM without offloading but with a GPU cache large enough to keep every prefix:
its second pass attends over the very KV bytes the first pass computed, which is exactly what a
correct offload restores. Recomputing instead (``none``, small cache) is not bit-identical in
bf16 on a GPU: seen on an H100, 27-34 of 128 greedy outputs differed from ``none`` for both vLLM
native offloading and TokenVM, even with ``VLLM_BATCH_INVARIANT=1``; with batches of 8, 10
(TokenVM) and 14 (native) differed from the big-cache reference, as loads that park requests
change batch composition. So requests run one at a time here.

Runner: ``--runner v1`` / ``v2`` sets ``VLLM_USE_V2_MODEL_RUNNER`` for every engine (vLLM
0.26 picks V2 for this model by default; on V1 TokenVM gets vLLM's cross-layer layout and copies
whole blocks by DMA). ``--configs`` picks a subset (the reference of each is added).

``--tp 2`` splits every engine over two GPUs (each rank keeps its own host pool).

Configurations run only when ``--configs`` names them (issue #14 items 3-5, issue #10), each
against its own big-cache reference in the same KV dtype, model and block size:

- ``tokenvm_sync`` and ``tokenvm_sync_graphs`` (``load_mode="sync"``: eager, and with CUDA
  graphs, which stay FULL; against ``reference`` and ``reference_graphs``);
- ``tokenvm_dma`` and ``tokenvm_dma_graphs`` (``copy_path="dma"``: every copy by the GPU's
  copy engines, no gather/scatter kernel; eager and with CUDA graphs);
- ``tokenvm_early`` and ``tokenvm_early_graphs`` (``load_early_finish``: a parked request runs
  as soon as the scheduler sees its copy's event fired; eager and with CUDA graphs);

- ``tokenvm_fp8`` (``kv_cache_dtype="fp8"``, FLASH_ATTN with FA3 on Hopper; per-layer scalar
  k/v scales, 1.0 here, nothing to store), ``tokenvm_fp8_e5m2`` (FA3 has no e5m2: vLLM picks
  FlashInfer or Triton) and ``tokenvm_fp8_pth`` (``fp8_per_token_head``: TRITON_ATTN keeps one
  float32 scale per token and head inline in the block, so the bytes TokenVM copies carry them);
- ``tokenvm_mla`` on a tiny DeepSeek-V2-shaped model (``tiny_deepseek``: DeepSeek's 512 + 64
  latent, 8 layers, no MoE; FLASH_ATTN_MLA on Hopper) and ``tokenvm_mla_corrupt``, its negative
  control (must differ);
- ``tokenvm_mla_tp2``: the same MLA model at TP=2 (two GPUs, whatever ``--tp`` says) against
  its own TP=2 reference; the latent KV is stored once (rank 0 writes a host pool both ranks
  map), so its ``tokenvm:store_bytes`` is ``stored_blocks`` x one block;
- ``tokenvm_bs32``, ``tokenvm_bs64``, ``tokenvm_bs128``: the Llama at block sizes 32, 64, 128,
  with the GPU cache, the prefixes and the reference cache holding the same tokens as at 16.

Each configuration fails on its own (an engine that cannot start, or a model that cannot be
generated, is reported and the others run); the summary lists every configuration.

    python ci/gpu/token_exact.py --out DIR [--runner v1] [--configs tokenvm,native] [--tp 2]
    python ci/gpu/token_exact.py --out DIR --configs \
        tokenvm_fp8,tokenvm_mla,tokenvm_bs32,tokenvm_bs64,tokenvm_bs128
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenvm_vllm.bench.prefix_reuse import (
    EngineSettings,
    Workload,
    add_gpu_share_args,
    run_in_subprocess,
)
from tokenvm_vllm.tiny_deepseek import TinyDeepseekShape, write_tiny_deepseek
from tokenvm_vllm.tiny_llama import TinyLlamaShape, write_tiny_llama

SHAPE = TinyLlamaShape(vocab_words=4093, hidden_size=1024, intermediate_size=2816, num_layers=8,
                       num_heads=16, num_kv_heads=8)
MLA_SHAPE = TinyDeepseekShape(vocab_words=4093, hidden_size=1024, intermediate_size=2816,
                              num_layers=8, num_heads=16)
"""DeepSeek-V2's latent (kv_lora_rank 512, rope 64) and head dims (128 + 64, v 128): the dims
vLLM's Hopper MLA kernels are built for."""
BLOCK_SIZE = 16
CACHE_TOKENS = 160 * BLOCK_SIZE
"""The small GPU cache: prefixes are evicted from it and revisited."""
REFERENCE_TOKENS = 2048 * BLOCK_SIZE
"""The reference's cache: keeps every prefix."""
PREFIX_TOKENS = 16 * BLOCK_SIZE


@dataclass(frozen=True)
class Config:
    make_settings: Callable[[], EngineSettings]
    """Built when the configuration runs (the MLA model is generated only then, and a failure
    to generate it fails only the configurations that need it)."""
    reference: str | None
    """The configuration whose outputs this one must equal (None: this is a reference)."""
    workload: Workload
    must_differ: bool = False
    """A negative control (corrupted loads): must give different outputs."""


def build_configs(base: EngineSettings, workload: Workload, mla_model: Callable[[], str],
                  ) -> tuple[dict[str, Config], list[str]]:
    """Every configuration by name, and the default set (what runs without ``--configs``)."""
    def cfg(settings: EngineSettings, reference: str | None, wl: Workload = workload,
            must_differ: bool = False) -> Config:
        return Config(lambda: settings, reference, wl, must_differ)

    def big(settings: EngineSettings) -> EngineSettings:
        return replace(settings, num_gpu_blocks=REFERENCE_TOKENS // settings.block_size)

    layerwise = {"load_mode": "layerwise"}
    corrupt = {"debug_corrupt_loads": True, "testing": True}
    configs: dict[str, Config] = {
        "reference": cfg(big(base), None), "none": cfg(base, "reference"),
        "tokenvm": cfg(replace(base, connector="tokenvm"), "reference"),
        "tokenvm_uva": cfg(replace(base, connector="tokenvm", extra_config={"copy_path": "uva"}),
                           "reference"),
        "tokenvm_wt": cfg(replace(base, connector="tokenvm",
                                  extra_config={"write_mode": "write_through"}), "reference"),
        "tokenvm_layerwise": cfg(replace(base, connector="tokenvm", extra_config=layerwise),
                                 "reference"),
        "native": cfg(replace(base, connector="native"), "reference"),
        "tokenvm_corrupt": cfg(replace(base, connector="tokenvm", extra_config=corrupt),
                               "reference", must_differ=True),
        # CUDA graphs on (PIECEWISE with layer-wise loads). Graphs (torch.compile) change bf16
        # numerics: graph runs compare with each other
        "reference_graphs": cfg(big(replace(base, enforce_eager=False)), None),
        "tokenvm_layerwise_graphs": cfg(replace(base, connector="tokenvm",
                                                extra_config=layerwise, enforce_eager=False),
                                        "reference_graphs"),
    }
    defaults = list(configs)
    # Sync loads (issue #10): the request runs in its lookup step and the forward waits on the
    # GPU for the whole copy. No per-layer waits, so with CUDA graphs on they stay FULL (not
    # PIECEWISE as with layer-wise loads): the graphs run checks that a replayed FULL graph
    # reads the loaded blocks only after the copy landed.
    # DMA copies (issue #10): no kernel at all, as vLLM's native offloading on V2; the lever to
    # measure against the staged path's gather/scatter kernels, which share SMs with decode.
    # Early finish (issue #10): the request runs at the first step after its copy's event
    # fired, taken from the worker in the scheduler's process; a copy that had not landed
    # would show as differing tokens.
    for name, extra in (("sync", {"load_mode": "sync"}), ("dma", {"copy_path": "dma"}),
                        ("early", {"load_early_finish": True})):
        configs[f"tokenvm_{name}"] = cfg(replace(base, connector="tokenvm", extra_config=extra),
                                         "reference")
        configs[f"tokenvm_{name}_graphs"] = cfg(
            replace(base, connector="tokenvm", extra_config=extra, enforce_eager=False),
            "reference_graphs")
    for kv_dtype, suffix in (("fp8", "fp8"), ("fp8_e5m2", "fp8_e5m2"),
                             ("fp8_per_token_head", "fp8_pth")):
        fp8 = replace(base, kv_cache_dtype=kv_dtype)
        configs[f"reference_{suffix}"] = cfg(big(fp8), None)
        configs[f"tokenvm_{suffix}"] = cfg(replace(fp8, connector="tokenvm"),
                                           f"reference_{suffix}")
    for block_size in (32, 64, 128):
        sized = replace(base, block_size=block_size, num_gpu_blocks=CACHE_TOKENS // block_size)
        # the same prompts as at block size 16 (same prefix tokens, same random draws)
        wl = replace(workload, prefix_blocks=PREFIX_TOKENS // block_size)
        configs[f"reference_bs{block_size}"] = cfg(big(sized), None, wl)
        configs[f"tokenvm_bs{block_size}"] = cfg(replace(sized, connector="tokenvm"),
                                                 f"reference_bs{block_size}", wl)
    configs["reference_mla"] = Config(
        lambda: big(replace(base, model=mla_model())), None, workload)
    configs["tokenvm_mla"] = Config(
        lambda: replace(base, model=mla_model(), connector="tokenvm"), "reference_mla", workload)
    configs["tokenvm_mla_corrupt"] = Config(
        lambda: replace(base, model=mla_model(), connector="tokenvm", extra_config=corrupt),
        "reference_mla", workload, must_differ=True)
    # MLA at TP=2 whatever --tp says: the latent KV is replicated, stored once by rank 0 into
    # a host pool both ranks map (mla_store_once); exact_tokenvm_mla_tp2.json's counters show
    # store_bytes == stored_blocks x one block (not twice that).
    configs["reference_mla_tp2"] = Config(
        lambda: big(replace(base, model=mla_model(), tensor_parallel_size=2)), None, workload)
    configs["tokenvm_mla_tp2"] = Config(
        lambda: replace(base, model=mla_model(), connector="tokenvm", tensor_parallel_size=2),
        "reference_mla_tp2", workload)
    return configs, defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--runner", choices=("default", "v1", "v2"), default="default")
    parser.add_argument("--configs", default="", help="comma-separated subset")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (GPUs)")
    add_gpu_share_args(parser)
    args = parser.parse_args()
    if args.runner != "default":  # inherited by every engine process
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if args.runner == "v2" else "0"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(write_tiny_llama(out / "small-llama", SHAPE, device="cuda"))
    # One request at a time: every configuration then runs the same forwards over the same
    # token ranges, so a difference can only come from the KV bytes (with batches of 8 the
    # parked loads change batch composition, and bf16 GEMMs then differ slightly).
    workload = Workload(documents=16, questions=4, prefix_blocks=PREFIX_TOKENS // BLOCK_SIZE,
                        suffix_tokens=40, max_tokens=16, batch_size=1)
    base = EngineSettings(model=model, block_size=BLOCK_SIZE,
                          num_gpu_blocks=CACHE_TOKENS // BLOCK_SIZE, max_num_seqs=1,
                          dtype="bfloat16", gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                          host_bytes="2GiB",
                          native_offload_gib=2.0, tensor_parallel_size=args.tp)
    configs, defaults = build_configs(
        base, workload, lambda: str(write_tiny_deepseek(out / "small-deepseek", MLA_SHAPE,
                                                        device="cuda")))
    names = defaults
    if args.configs:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
        unknown = [n for n in names if n not in configs]
        if unknown:
            parser.error(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(configs)}")
    # a comparison needs its reference: add it, ahead of the configurations that use it
    wanted: list[str] = []
    for name in names:
        reference = configs[name].reference
        for n in ([reference] if reference else []) + [name]:
            if n not in wanted:
                wanted.append(n)
    errors: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}
    for name in wanted:
        config = configs[name]
        print(f"running {name} (reference: {config.reference or '-'}) ...", flush=True)
        try:
            settings = config.make_settings()
        except Exception as err:  # noqa: BLE001 - e.g. the MLA model cannot be generated
            errors[name] = f"setup failed: {type(err).__name__}: {err}"
            print(f"  {name} {errors[name]}", flush=True)
            continue
        try:
            results[name] = run_in_subprocess(settings, config.workload,
                                              out / f"exact_{name}.json")
        except Exception as err:  # noqa: BLE001 - one engine's failure must not stop the rest
            errors[name] = f"engine failed: {type(err).__name__}: {str(err)[-1500:]}"
            print(f"  {name} {errors[name]}", flush=True)
    summary: dict[str, Any] = {}
    for name in wanted:
        config = configs[name]
        if name in errors:
            summary[name] = {"status": "FAILED", "error": errors[name][-600:]}
        elif config.reference is None:
            summary[name] = {"status": "reference", "requests": len(results[name]["outputs"]),
                             "pass_s": [round(x, 2) for x in results[name]["pass_s"]]}
        elif config.reference not in results:
            summary[name] = {"status": "NO REFERENCE", "reference": config.reference}
        else:
            r, base_out = results[name], results[config.reference]["outputs"]
            c = r["counters"]
            entry: dict[str, Any] = {
                "reference": config.reference,
                "requests": len(r["outputs"]),
                "differing": sum(r["outputs"][k] != base_out[k] for k in base_out),
                "loaded_tokens": c.get("vllm:prompt_tokens_by_source[external_kv_transfer]", 0),
                "tokenvm_loaded_blocks": c.get("tokenvm:loaded_blocks", 0),
                "pass_s": [round(x, 2) for x in r["pass_s"]],
            }
            if "_early" in name:  # the scheduler side found its worker (early_finish.py):
                # its log says so when not. (Not the counters: vLLM 0.26's offline LLMEngine
                # records a step's stats only when the step has request outputs, so the stats
                # of steps where the one request waits for its load are dropped: tokenvm:*
                # came back with loaded_blocks 0 beside 24,624 tokens loaded.)
                log = (out / f"exact_{name}.log").read_text(errors="replace")
                entry["early_linked"] = "no worker of this engine" not in log
            entry["status"] = _verdict(name, config, entry)
            summary[name] = entry
        print(name, json.dumps(summary[name]), flush=True)
    summary["_runner"] = args.runner
    summary["_tp"] = args.tp
    (out / "token_exact.json").write_text(json.dumps(summary, indent=1))
    print("\nTOKEN-EXACT per configuration:")
    for name in wanted:
        entry = summary[name]
        if "error" in entry:  # its end names the cause (the engine log's last lines)
            detail = " | ".join(entry["error"].splitlines())[-300:]
        elif "differing" in entry:
            detail = (f"{entry['differing']}/{entry['requests']} differ from "
                      f"{entry['reference']}, {entry['loaded_tokens']:.0f} tokens loaded"
                      + (", scheduler linked to its worker" if entry.get("early_linked")
                         else ""))
        else:
            detail = ""
        print(f"  {name:28s} {entry['status']:12s} {detail}")
    ok = all(summary[n]["status"] in ("PASS", "DIFFERS (ok)", "n/a", "reference")
             for n in wanted)
    print("TOKEN-EXACT", "PASS" if ok else "FAIL")


def _verdict(name: str, config: Config, entry: dict[str, Any]) -> str:
    """PASS: TokenVM loaded KV and every output equals the reference's. A negative control
    passes when outputs differ. Other configurations (``none``, ``native``) are reported only."""
    if config.must_differ:
        return "DIFFERS (ok)" if entry["differing"] > 0 else "SAME (FAIL)"
    if not name.startswith("tokenvm"):
        return "n/a"
    if not entry.get("early_linked", True):  # load_early_finish never engaged
        return "NO LINK (FAIL)"
    if entry["differing"] == 0 and entry["loaded_tokens"] > 0:
        return "PASS"
    return "FAIL" if entry["differing"] else "NO LOADS (FAIL)"


if __name__ == "__main__":
    main()
