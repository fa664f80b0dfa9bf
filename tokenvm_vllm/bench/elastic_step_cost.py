"""What elastic mode costs the scheduler per engine step, in CPU time (runs on CPU).

A fixed pool pays none of it. vLLM's engine core runs the scheduler between GPU steps: on the
H200 a decode step of the wave workload with CUDA graphs takes ~5 ms, so every 0.1 ms of Python
here is ~2% of TPOT and delays every new request's first step (issue #13's wave, 2026-12-01:
elastic TPOT +9-16% and TTFT p50 1.3x a fixed pool in burst 2, both orders, the load copies
themselves no slower).

It drives ``SchedulerElastic``, the object the connector's scheduler calls, over vLLM's real
``BlockPool`` with the KV geometry of the serving benchmark's model on vLLM 0.26's V2 runner
(Llama-3.1-8B: 32 per-layer tensors, 64 KiB blocks of 16 tokens, 6 GiB = 3,072 blocks, 2 MiB
pages: 96 page groups of 32 pages), calling its hooks as the connector does each step:
``before_alloc`` for each waiting request, ``end_of_schedule``, ``take_commands`` (answered at
once by a worker that keeps the reserve full), ``after_meta``, ``export``. Only the hooks are
timed, not vLLM's own allocation. Two phases, like a burst's: ``growth`` (from the floor to
the ceiling, one 264-block request admitted per step) and ``at ceiling`` (every group mapped,
requests finishing and arriving, the free blocks short of what waiting requests want, so every
``before_alloc`` asks to grow and cannot).

    python -m tokenvm_vllm.bench.elastic_step_cost [--steps 2000] [--waiting 4] [--json OUT]

Prints microseconds per step (p50, p90, mean) for each phase.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tokenvm_vllm.bench.stats import percentile
from tokenvm_vllm.config import load_config
from tokenvm_vllm.connector.stats import TokenVMStats
from tokenvm_vllm.elastic.scheduler_side import SchedulerElastic

LAYERS, BLOCK_BYTES, NUM_BLOCKS, BLOCK_TOKENS = 32, 64 * 1024, 3072, 16
PROMPT_BLOCKS = 264  # a 4,224-token prompt


def kv_cache_config(layers: int = LAYERS, num_blocks: int = NUM_BLOCKS,
                    block_bytes: int = BLOCK_BYTES) -> Any:
    """The parts of vLLM's ``KVCacheConfig`` elastic mode reads: one tensor per layer."""
    return SimpleNamespace(
        num_blocks=num_blocks,
        kv_cache_tensors=[SimpleNamespace(size=num_blocks * block_bytes, shared_by=[f"l{i}"])
                          for i in range(layers)],
        kv_cache_groups=[])


def make_elastic(layers: int = LAYERS, num_blocks: int = NUM_BLOCKS) -> tuple[Any, Any]:
    """A fresh vLLM ``BlockPool`` and a ``SchedulerElastic`` on it (floor 0, no ceiling)."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import init_none_hash

    init_none_hash(sha256)
    block_pool = BlockPool(num_blocks, enable_caching=True, hash_block_size=BLOCK_TOKENS)
    config = load_config({"elastic": True, "shrink_idle_s": 1000}, environ={})
    elastic = SchedulerElastic(
        block_pool, kv_cache_config(layers, num_blocks), config,
        is_spilled=lambda key: True, request_store=lambda pairs: None,
        reserve_blocks=32, max_step_blocks=512)
    return block_pool, elastic


def run(steps: int = 2000, waiting: int = 4, layers: int = LAYERS) -> dict[str, dict[str, float]]:
    """Time the hooks per step in the two phases; returns ``{phase: {p50_us, p90_us, mean_us,
    steps}}``."""
    block_pool, elastic = make_elastic(layers)
    stats = TokenVMStats()
    held: list[list[Any]] = []  # the running requests' blocks
    timings: dict[str, list[float]] = {"growth": [], "at ceiling": []}

    def step() -> float:
        """One engine step that admits a request if it fits; returns the seconds spent in
        elastic's hooks."""
        spent = 0.0
        start = time.perf_counter()
        for _ in range(waiting):
            elastic.before_alloc(PROMPT_BLOCKS + 1)
        spent += time.perf_counter() - start
        if block_pool.get_num_free_blocks() >= PROMPT_BLOCKS:
            held.append(block_pool.get_new_blocks(PROMPT_BLOCKS))
        start = time.perf_counter()
        elastic.end_of_schedule(serving=True)
        _, target = elastic.take_commands()
        # The worker applies the metadata and refills its reserve to the target at once.
        elastic.reported([(elastic.ledger.sent, target)])
        elastic.after_meta(waiting * (PROMPT_BLOCKS + 1))
        elastic.export(stats)
        spent += time.perf_counter() - start
        return spent

    growth_steps = 0
    while elastic.pool.usable_blocks < NUM_BLOCKS and growth_steps < steps:
        timings["growth"].append(step())
        growth_steps += 1
    for i in range(steps):
        if held and i % 3 == 0:  # a request finishes, a new one is admitted if it fits
            block_pool.free_blocks(held.pop(0))
        timings["at ceiling"].append(step())
    result: dict[str, dict[str, float]] = {}
    for phase, seconds in timings.items():
        us = sorted(s * 1e6 for s in seconds)
        result[phase] = {"steps": len(us), "p50_us": statistics.median(us) if us else 0.0,
                         "p90_us": percentile(us, 0.9) if us else 0.0,
                         "mean_us": statistics.fmean(us) if us else 0.0}
    result["at ceiling"]["usable_blocks"] = elastic.pool.usable_blocks
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="steps at the ceiling")
    parser.add_argument("--waiting", type=int, default=4,
                        help="waiting requests, each asking before_alloc every step")
    parser.add_argument("--layers", type=int, default=LAYERS,
                        help="per-layer KV tensors (regions of a page group)")
    parser.add_argument("--json", default="", help="write the result here too")
    args = parser.parse_args()
    result = run(args.steps, args.waiting, args.layers)
    print(f"elastic scheduler hooks per step ({args.layers} layers, {NUM_BLOCKS} blocks, "
          f"{args.waiting} waiting requests); a fixed pool spends 0")
    print(f"{'phase':12s} {'steps':>6s} {'p50 us':>8s} {'p90 us':>8s} {'mean us':>8s}")
    for phase, row in result.items():
        print(f"{phase:12s} {row['steps']:6.0f} {row['p50_us']:8.1f} {row['p90_us']:8.1f} "
              f"{row['mean_us']:8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
