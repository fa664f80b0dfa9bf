"""Two tensor-parallel ranks behind vLLM's real Scheduler and vLLM's real ``KVOutputAggregator``.

The scheduler-level harness (``tests/harness.py``) with a second TokenVM worker: each rank has
its own KV tensors and host pool, both carry out the one plan the scheduler side makes per step,
and their outputs reach the scheduler through ``KVOutputAggregator`` (what vLLM's multiprocess
executor does at TP>1: ``vllm/distributed/kv_transfer/kv_connector/utils.py``). The fake forward
writes and checks both ranks' KV, so a block that is wrong on ONE rank is caught. The end-to-end
counterpart with a real TP=2 engine is ``tests/e2e/test_tensor_parallel.py``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pytest
import torch
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from tests.harness import Harness, KVMismatch
from tokenvm_vllm import compat
from tokenvm_vllm.connector.connector import TokenVMConnector
from tokenvm_vllm.connector.jobs import JobTable

BLOCK = 16
SLOT_BYTES = 2 * BLOCK * 2 * 4
"""One block of the harness's 2 layers: 16 tokens x (K, V) x float32, on each rank."""


@dataclass
class TwoRankHarness(Harness):
    """``Harness`` with ranks 0 and 1; ``union_errors=False`` hands vLLM only rank 0's load
    errors (a negative control: what would go wrong if failures were not aggregated)."""

    union_errors: bool = True
    rank_kv: list[dict[str, torch.Tensor]] = field(default_factory=list)
    workers: list[TokenVMConnector] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()  # rank 0: self.worker, self.kv
        scheduler = self.connector.scheduler
        assert scheduler is not None and len(scheduler.jobs) == 0
        scheduler.num_workers = 2  # as vLLM's parallel_config.world_size would say at TP=2
        scheduler.jobs = scheduler.planner.jobs = JobTable(2)
        with mock.patch.object(compat, "tensor_parallel_rank_and_size", return_value=(1, 2)):
            rank1 = TokenVMConnector(self.vllm_config, KVConnectorRole.WORKER,
                                     self.kv_cache_config)
        kv1 = {name: torch.full_like(kv, -1.0) for name, kv in self.kv.items()}
        rank1.register_kv_caches(kv1)
        self.workers = [self.worker, rank1]
        self.rank_kv = [self.kv, kv1]
        self.aggregator = KVOutputAggregator(expected_finished_count=2)

    def step(self) -> None:
        output = self._begin_step(self.workers)
        req_ids, sampled = self._forward(output)
        per_rank = [self._runner_output(worker, output, req_ids, sampled)
                    for worker in self.workers]
        if not self.union_errors:
            per_rank[1].kv_connector_output.invalid_block_ids = set()
        merged = self.aggregator.aggregate(per_rank)
        assert merged is not None
        self._end_step(output, merged)

    def _write(self, block_ids: list[int], pos: int, value: float,
               layers: list[str] | None = None) -> None:  # (one group: every layer)
        block, offset = self._slot(block_ids, pos)
        for kv_caches in self.rank_kv:
            for kv in kv_caches.values():
                kv[block, :, offset] = value

    def _check(self, block_ids: list[int], pos: int, tokens: list[int], req_id: str,
               layers: list[str] | None = None) -> None:
        from tests.harness import prefix_value

        block, offset = self._slot(block_ids, pos)
        want = prefix_value(tokens)
        for rank, kv_caches in enumerate(self.rank_kv):
            for name, kv in kv_caches.items():
                got = kv[block, :, offset].flatten().tolist()
                if got != [want, want]:
                    raise KVMismatch(f"rank {rank} {req_id} pos {pos} block {block} layer "
                                     f"{name}: {got} != {want}")


def prompts(n: int, prefix_blocks: int, suffix: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 1000) for _ in range(prefix_blocks * BLOCK)]
    return [prefix + [rng.randrange(3, 1000) for _ in range(suffix)] for _ in range(n)]


def revisit(h: Harness) -> str:
    """Store an 8-block prefix, evict it from the GPU cache, and revisit it."""
    first, again = prompts(2, prefix_blocks=8, suffix=5, seed=1)
    h.add(first)
    h.run()
    for i in range(2):  # unrelated requests that need every GPU block
        (p,) = prompts(1, h.num_gpu_blocks - 3, 1, seed=100 + i)
        h.add(p, max_tokens=1)
        h.run()
    rid = h.add(again)
    h.run()
    return rid


def make(tiny_model_config: str, **extra: Any) -> TwoRankHarness:
    return TwoRankHarness(tiny_model_config, block_size=BLOCK, num_gpu_blocks=24,
                          extra_config=extra)


def test_both_ranks_copy_every_planned_block(tiny_model_config: str) -> None:
    h = make(tiny_model_config)
    revisit(h)  # the fake forward checks both ranks' KV at every computed position
    assert h.stats["loaded_blocks"] == 8  # planned once, by the one scheduler side
    assert h.stats["load_bytes"] == 2 * 8 * SLOT_BYTES  # copied by each rank
    assert len(h.connector.scheduler.jobs) == 0


def test_load_failing_on_rank_1_only_is_recomputed_on_both(tiny_model_config: str) -> None:
    h = make(tiny_model_config, debug_fail_load_every=1, debug_fail_load_rank=1, testing=True)
    rid = revisit(h)
    assert h.stats["failed_load_blocks"] == 8  # the job failed: rank 1 failed it
    assert h.stats["load_bytes"] == 8 * SLOT_BYTES  # rank 0 did copy
    assert len(h.outputs[rid]) == 4


def test_without_aggregated_errors_rank_1_would_read_bad_kv(tiny_model_config: str) -> None:
    """The check above can fail: if vLLM heard only rank 0, rank 1's blocks would be used."""
    h = make(tiny_model_config, debug_fail_load_every=1, debug_fail_load_rank=1, testing=True)
    h.union_errors = False
    with pytest.raises(KVMismatch, match="rank 1"):
        revisit(h)
