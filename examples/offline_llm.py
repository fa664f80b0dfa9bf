"""Offline vLLM (``LLM(...)``) with the TokenVM connector, on a tiny generated Llama.

Eight documents of 8 blocks (64 blocks) pass through a 48-block KV cache, so by the time each is
asked its second question its prefix has been evicted from vLLM's cache; TokenVM brings it back
from host RAM instead of recomputing it. Greedy decoding; prints each output and TokenVM's counters.

    python examples/offline_llm.py [--model DIR] [--out out/offline]

With a real model on a GPU, pass ``--model`` and ``--dtype auto`` and raise ``--gpu-blocks`` (or
drop ``num_gpu_blocks_override``) and ``host_bytes``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from vllm import LLM, SamplingParams

from tokenvm_vllm.tiny_llama import TinyLlamaShape, word, write_tiny_llama

BLOCK_SIZE = 32


def tokenvm_counters() -> dict[str, float]:
    """TokenVM's Prometheus counters in this process, summed over engines.

    ``LLM.get_metrics()`` lists only ``vllm:`` metrics; vLLM's stat logger feeds TokenVM's
    ``tokenvm:<name>_total`` counters into this process's Prometheus registry.
    """
    from prometheus_client import REGISTRY

    totals: dict[str, float] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name.startswith("tokenvm:") and sample.name.endswith("_total"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: generate a tiny Llama)")
    parser.add_argument("--out", default="out/offline", help="where the tiny model is written")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--gpu-blocks", type=int, default=48, help="KV cache blocks (48)")
    parser.add_argument("--host-bytes", default="64MiB", help="TokenVM host tier (64MiB)")
    args = parser.parse_args()
    model = args.model or str(write_tiny_llama(Path(args.out) / "tiny-llama"))

    llm = LLM(
        model=model,
        dtype=args.dtype,
        block_size=BLOCK_SIZE,
        num_gpu_blocks_override=args.gpu_blocks,
        max_model_len=1024,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        enable_prefix_caching=True,
        disable_log_stats=False,  # TokenVM's counters ride on vLLM's stats
        kv_transfer_config={
            "kv_connector": "TokenVM",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"host_bytes": args.host_bytes},
        },
    )
    rng = random.Random(0)
    vocab = TinyLlamaShape().vocab_words

    def text(n: int) -> str:
        return " ".join(word(rng.randrange(vocab)) for _ in range(n))

    documents = [text(8 * BLOCK_SIZE) for _ in range(8)]
    questions = [[text(12) for _ in range(2)] for _ in documents]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    for round_ in range(2):  # round 2 revisits every document after the others evicted it
        for doc_idx, (doc, qs) in enumerate(zip(documents, questions, strict=True)):
            (output,) = llm.generate([doc + " " + qs[round_]], params, use_tqdm=False)
            print(f"round {round_ + 1} document {doc_idx}: {output.outputs[0].text!r}")

    print()
    for name, value in sorted(tokenvm_counters().items()):
        print(f"{name:<36} {value:g}")
    external = [m for m in llm.get_metrics()
                if m.name == "vllm:prompt_tokens_by_source"
                and (getattr(m, "labels", None) or {}).get("source") == "external_kv_transfer"]
    for metric in external:
        print(f"{'prompt tokens loaded by TokenVM':<36} {getattr(metric, 'value', 0):g}")


if __name__ == "__main__":
    main()
