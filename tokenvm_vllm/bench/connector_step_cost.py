"""What TokenVM's connector costs vLLM's engine loop per step, in CPU time (runs on CPU).

Issue #10's mean TPOT target is 1.0x native. With CUDA graphs a decode step of the serving
benchmark takes 5-12 ms on an H200, and the engine core's Python (``schedule()`` and
``update_from_output()``) and the worker's connector calls run between the GPU's steps: every
0.1 ms of Python added per step is 1-2% of TPOT. This measures that Python.

It runs vLLM's real ``Scheduler`` twice over the same closed-loop workload, once without a KV
connector and once with TokenVM's scheduler side and a real TokenVM worker (CPU tensors, the
torch copy engine), and a fake forward that only samples a token where a prompt is done. The
workload is the serving benchmark's P at one size scaled for CPU: ``--prefixes`` prefixes of
``--prefix-blocks`` blocks plus a suffix, ``--concurrency`` requests in flight, 3,072 GPU blocks,
a host tier of ``--host-slots`` slots (the H200 runs: 20 GiB = 10,240 slots of 2 MiB). Per step:
the engine core's time in ``schedule()`` + ``update_from_output()``, with and without TokenVM,
and the worker's time in the connector's calls (``bind_connector_metadata``, ``start_load_kv``,
``get_finished``, the worker metadata; on a GPU these also queue the copies). Steps are split
into decode-only steps and steps with prompt tokens (where lookups, loads and stores happen).

    python -m tokenvm_vllm.bench.connector_step_cost [--requests 256] [--json OUT]

Prints microseconds per step (p50, mean) for each configuration and kind of step, what TokenVM
adds, and the prompt tokens each computed (TokenVM's loads from host make its count lower).
The absolute numbers are this CPU's; the ratio of TokenVM's addition to a step's GPU time is
what matters on the GPU. With vLLM's async scheduling the engine core schedules the next step
while the GPU runs this one, so its time is on the critical path only where it exceeds the
GPU's; the worker's is on it always. On CPU the worker's number includes the torch copy
engine's copies, which a GPU only queues.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BLOCK_SIZE = 16
NUM_BLOCKS = 3072
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
SLOT_BYTES = 2 * BLOCK_SIZE * 2 * 4
"""One block of the two fake layers: 16 tokens x (K, V) x float32."""


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Engine:
    """vLLM's ``Scheduler`` with (``tokenvm``) or without a KV connector, a TokenVM worker on
    CPU tensors, and a fake forward; ``step()`` returns its timings."""

    def __init__(self, model_dir: str, tokenvm: bool, concurrency: int, host_slots: int,
                 settings: dict[str, Any] | None = None) -> None:
        import torch
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.engine.arg_utils import EngineArgs
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        from tokenvm_vllm.connector.connector import TokenVMConnector

        transfer = {"kv_connector": "TokenVM", "kv_role": "kv_both",
                    "kv_connector_extra_config": {"host_bytes": host_slots * SLOT_BYTES,
                                                  **(settings or {})}}
        args = EngineArgs(
            model=model_dir, dtype="float32", block_size=BLOCK_SIZE, max_num_seqs=concurrency,
            max_num_batched_tokens=8192, max_model_len=8192, enable_prefix_caching=True,
            enable_chunked_prefill=True, kv_transfer_config=transfer if tokenvm else None)
        vllm_config = args.create_engine_config()
        vllm_config.cache_config.num_gpu_blocks = NUM_BLOCKS
        spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=1, head_size=1,
                                 dtype=torch.float32)
        kv_cache_config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                                        kv_cache_groups=[KVCacheGroupSpec(list(LAYERS), spec)])
        self.scheduler = Scheduler(
            vllm_config=vllm_config, kv_cache_config=kv_cache_config,
            structured_output_manager=StructuredOutputManager(vllm_config),
            block_size=BLOCK_SIZE, log_stats=True)
        self.worker: Any = None
        if tokenvm:
            self.worker = TokenVMConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
            self.worker.register_kv_caches(
                {name: torch.zeros(NUM_BLOCKS, 1, BLOCK_SIZE, 2) for name in LAYERS})
        init_none_hash(sha256)
        self.hasher = get_request_block_hasher(BLOCK_SIZE, sha256)
        self.ids = 0

    def add(self, prompt: list[int], max_tokens: int) -> None:
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        self.ids += 1
        self.scheduler.add_request(Request(
            request_id=f"r{self.ids}", prompt_token_ids=prompt,
            sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            pooling_params=None, block_hasher=self.hasher))

    def step(self) -> tuple[float, float, int]:
        """One engine step: (engine-core seconds, worker connector seconds, prompt tokens it
        computed)."""
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        start = time.perf_counter()
        output = self.scheduler.schedule()
        scheduled = time.perf_counter()
        worker_s = 0.0
        connector_output = None
        if self.worker is not None:
            t0 = time.perf_counter()
            meta = output.kv_connector_metadata
            self.worker.handle_preemptions(meta)
            self.worker.bind_connector_metadata(meta)
            self.worker.start_load_kv(None)
            worker_s += time.perf_counter() - t0
        req_ids, sampled, prompt = [], [], 0
        for req_id, tokens in output.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            done = request.num_computed_tokens >= request.num_tokens
            first = request.num_computed_tokens - tokens  # (schedule() advanced it)
            prompt += max(0, min(request.num_prompt_tokens, first + tokens) - first)
            req_ids.append(req_id)
            sampled.append([7] if done else [])
        if self.worker is not None:
            t0 = time.perf_counter()
            self.worker.wait_for_save()
            finished_sending, finished_recving = self.worker.get_finished(
                output.finished_req_ids)
            connector_output = KVConnectorOutput(
                finished_sending=finished_sending, finished_recving=finished_recving,
                invalid_block_ids=self.worker.get_block_ids_with_load_errors(),
                kv_connector_worker_meta=self.worker.build_connector_worker_meta())
            self.worker.clear_connector_metadata()
            worker_s += time.perf_counter() - t0
        runner_output = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled, kv_connector_output=connector_output)
        before_update = time.perf_counter()
        self.scheduler.update_from_output(output, runner_output)
        end = time.perf_counter()
        return (scheduled - start) + (end - before_update), worker_s, prompt

    def busy(self) -> bool:
        return bool(self.scheduler.has_unfinished_requests()
                    or self.scheduler.has_finished_requests())


def workload(requests: int, prefixes: int, prefix_blocks: int, suffix: int,
             seed: int = 0) -> list[list[int]]:
    """P: each request one of ``prefixes`` shared prefixes plus its own suffix."""
    rng = random.Random(seed)
    shared = [[rng.randrange(10, 900) for _ in range(prefix_blocks * BLOCK_SIZE)]
              for _ in range(prefixes)]
    return [shared[rng.randrange(prefixes)] + [rng.randrange(10, 900) for _ in range(suffix)]
            for _ in range(requests)]


def run(model_dir: str, requests: int = 256, concurrency: int = 32, prefixes: int = 32,
        prefix_blocks: int = 256, suffix: int = 128, output_tokens: int = 32,
        host_slots: int = 10240, progress: Callable[[str], None] = _progress,
        settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Both configurations over the same prompts; returns per configuration and kind of step
    ``{steps, p50_us, mean_us}`` of the engine core's and the worker's time, the steps, and
    the requests running per step on average (``settings``: TokenVM settings, e.g.
    ``load_defer_steps``, which changes the order requests run in)."""
    prompts = workload(requests, prefixes, prefix_blocks, suffix)
    result: dict[str, Any] = {"settings": {
        "requests": requests, "concurrency": concurrency, "prefixes": prefixes,
        "prefix_blocks": prefix_blocks, "suffix_tokens": suffix,
        "output_tokens": output_tokens, "host_slots": host_slots, "gpu_blocks": NUM_BLOCKS,
        "tokenvm_settings": settings or {}}}
    for name in ("none", "tokenvm"):
        engine = Engine(model_dir, name == "tokenvm", concurrency, host_slots, settings)
        # As vLLM's engine core after start-up (freeze_gc_heap): objects made so far leave the
        # collector's generations, so a collection walks only what serving allocates.
        gc.collect()
        gc.freeze()
        queue = list(prompts)
        times: dict[str, dict[str, list[float]]] = {
            kind: {"engine": [], "worker": []} for kind in ("decode", "prompt")}
        started = time.perf_counter()
        in_flight = computed = running = 0
        while queue or engine.busy():
            if sum(len(k["engine"]) for k in times.values()) > 100 * requests + 10_000:
                raise RuntimeError(f"{name}: the requests did not finish (a prompt longer than "
                                   "the model length, 8192 tokens?)")
            while queue and in_flight < concurrency:
                engine.add(queue.pop(0), output_tokens)
                in_flight += 1
            engine_s, worker_s, prompt = engine.step()
            computed += prompt
            running += len(engine.scheduler.running)
            in_flight = len(engine.scheduler.requests)
            kind = times["prompt" if prompt else "decode"]
            kind["engine"].append(engine_s * 1e6)
            kind["worker"].append(worker_s * 1e6)
            steps = sum(len(k["engine"]) for k in times.values())
            if steps % 500 == 0:
                progress(f"{name}: {steps} steps, {len(queue)} requests not yet sent")
        result[name] = {kind: {part: {"steps": len(us),
                                      "p50_us": statistics.median(us) if us else 0.0,
                                      "mean_us": statistics.fmean(us) if us else 0.0}
                               for part, us in parts.items()}
                        for kind, parts in times.items()}
        result[name]["wall_s"] = time.perf_counter() - started
        result[name]["prompt_tokens_computed"] = computed
        steps = sum(len(k["engine"]) for k in times.values())
        result[name]["steps"] = steps
        result[name]["mean_running"] = running / max(1, steps)
        progress(f"{name}: done in {result[name]['wall_s']:.1f} s")
    return result


def print_result(result: dict[str, Any]) -> None:
    s = result["settings"]
    print(f"per-step CPU time (us), vLLM's Scheduler with and without TokenVM: {s['requests']} "
          f"requests, {s['concurrency']} in flight, {s['prefixes']} prefixes of "
          f"{s['prefix_blocks']} blocks + {s['suffix_tokens']} tokens, {s['output_tokens']} "
          f"out, {s['gpu_blocks']} GPU blocks, {s['host_slots']} host slots")
    print(f"{'step kind':10s} {'steps':>6s} {'engine none p50/mean':>22s} "
          f"{'engine tokenvm p50/mean':>24s} {'worker tokenvm p50/mean':>24s} "
          f"{'added mean':>11s}")
    for kind in ("decode", "prompt"):
        none, tvm = result["none"][kind], result["tokenvm"][kind]
        added = (tvm["engine"]["mean_us"] - none["engine"]["mean_us"]
                 + tvm["worker"]["mean_us"])
        print(f"{kind:10s} {tvm['engine']['steps']:6d} "
              f"{none['engine']['p50_us']:10.0f} / {none['engine']['mean_us']:9.0f} "
              f"{tvm['engine']['p50_us']:11.0f} / {tvm['engine']['mean_us']:10.0f} "
              f"{tvm['worker']['p50_us']:11.0f} / {tvm['worker']['mean_us']:10.0f} "
              f"{added:11.0f}")
    print(f"prompt tokens computed: none {result['none']['prompt_tokens_computed']:,}, "
          f"tokenvm {result['tokenvm']['prompt_tokens_computed']:,} (the rest came from host)")
    print(f"engine steps to finish: none {result['none']['steps']}, tokenvm "
          f"{result['tokenvm']['steps']}; requests running per step: none "
          f"{result['none']['mean_running']:.1f}, tokenvm {result['tokenvm']['mean_running']:.1f}"
          + (f" (tokenvm settings {s['tokenvm_settings']})" if s["tokenvm_settings"] else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prefixes", type=int, default=32)
    parser.add_argument("--prefix-blocks", type=int, default=256)
    parser.add_argument("--suffix", type=int, default=128, help="suffix tokens per request")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--host-slots", type=int, default=10240)
    parser.add_argument("--json", default="", help="write the result here too")
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a TokenVM setting for the tokenvm run (repeatable), e.g. "
                             "load_defer_steps=5")
    args = parser.parse_args()
    settings: dict[str, Any] = {}
    for item in args.setting:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--setting {item!r}: give KEY=VALUE, e.g. load_defer_steps=5")
        settings[key] = value
    from tokenvm_vllm.tiny_llama import write_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_tiny_llama(Path(tmp) / "tiny", weights=False))
        result = run(model, args.requests, args.concurrency, args.prefixes, args.prefix_blocks,
                     args.suffix, args.output_tokens, args.host_slots, settings=settings)
    print_result(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
