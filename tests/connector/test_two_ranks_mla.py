"""MLA at TP=2: the replicated latent KV is stored once (``mla_store_once``, worker.py).

The two-rank harness (``test_two_ranks.py``: vLLM's real Scheduler and ``KVOutputAggregator``,
two real TokenVM workers on CPU tensors) with an ``MLAAttentionSpec`` KV cache group and a
parallel config of TP=2. Rank 0 alone copies GPU -> host into a pool both ranks map; the fake
forward checks BOTH ranks' KV at every computed position, and rank 1's KV starts as -1, so a
block rank 1 did not load from rank 0's one copy fails the run. The end-to-end counterpart:
``tests/e2e/test_mla_tensor_parallel.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MLAAttentionSpec,
)

from tests.connector.test_two_ranks import BLOCK, SLOT_BYTES, TwoRankHarness, prompts, revisit
from tests.redis_servers import RedisServer
from tokenvm_vllm.connector.worker import TokenVMWorker
from tokenvm_vllm.transfer.layout import replicated_latent_kv


def make(tiny_model_config: str, mla: bool = True, **extra: Any) -> TwoRankHarness:
    return TwoRankHarness(tiny_model_config, block_size=BLOCK, num_gpu_blocks=24, mla=mla,
                          tensor_parallel_size=2, extra_config=extra)


def ranks(h: TwoRankHarness) -> list[TokenVMWorker]:
    workers = [w.worker for w in h.workers]
    assert all(w is not None for w in workers)
    return workers  # type: ignore[return-value]


def test_one_writer_one_pool_both_ranks_load_the_one_copy(tiny_model_config: str) -> None:
    h = make(tiny_model_config)
    rank0, rank1 = ranks(h)
    assert (rank0.store_once, rank0.writer, rank1.store_once, rank1.writer) == (
        True, True, True, False)
    path = rank0.shared_pool_path
    assert path is not None and path == rank1.shared_pool_path and os.path.exists(path)
    revisit(h)  # the forward checks both ranks' KV, rank 1's loaded from rank 0's copy
    assert not os.path.exists(path)  # rank 0 removed the name at its first step
    assert h.stats["loaded_blocks"] == 8
    assert h.stats["load_bytes"] == 2 * 8 * SLOT_BYTES  # each rank loads into its own KV
    # Only rank 0 copied GPU -> host: one copy of each stored block, not two.
    assert h.stats["store_bytes"] == h.stats["stored_blocks"] * SLOT_BYTES
    # One pool: a byte written through rank 0's mapping is seen through rank 1's.
    pool0, pool1 = rank0._pool, rank1._pool
    assert pool0 is not None and pool1 is not None
    last = pool0.num_slots - 1
    pool0.buffer[last, :4] = 7
    assert pool1.buffer[last, :4].tolist() == [7, 7, 7, 7]
    assert len(h.connector.scheduler.jobs) == 0


def test_store_once_false_keeps_a_copy_per_rank(tiny_model_config: str) -> None:
    h = make(tiny_model_config, mla_store_once=False)
    rank0, rank1 = ranks(h)
    assert not rank0.store_once and rank1.writer and rank0.shared_pool_path is None
    revisit(h)
    assert h.stats["store_bytes"] == 2 * h.stats["stored_blocks"] * SLOT_BYTES
    pool0, pool1 = rank0._pool, rank1._pool
    assert pool0 is not None and pool1 is not None
    pool0.buffer[0, :4] = 7
    assert pool1.buffer[0, :4].tolist() != [7, 7, 7, 7]


def test_non_mla_models_are_unchanged(tiny_model_config: str) -> None:
    h = make(tiny_model_config, mla=False)
    rank0, rank1 = ranks(h)
    assert not rank0.store_once and not rank1.store_once and rank1.writer
    revisit(h)
    assert h.stats["store_bytes"] == 2 * h.stats["stored_blocks"] * SLOT_BYTES


def test_load_failing_on_rank_1_only_is_recomputed_on_both(tiny_model_config: str) -> None:
    h = make(tiny_model_config, debug_fail_load_every=1, debug_fail_load_rank=1, testing=True)
    rid = revisit(h)  # rank 1's blocks would hold -1: the forward's check would raise
    assert h.stats["failed_load_blocks"] == 8
    assert h.stats["load_bytes"] == 8 * SLOT_BYTES  # rank 0 did copy
    assert len(h.outputs[rid]) == 4


def test_disk_tier_is_written_once_and_serves_both_ranks(
        tiny_model_config: str, tmp_path: Path) -> None:
    # 16 host slots: a revisit of 8 prefix blocks after 3 other prompts must come from disk
    h = make(tiny_model_config, host_bytes=16 * SLOT_BYTES, disk_path=str(tmp_path / "disk"),
             disk_bytes="4MiB")
    rank0, rank1 = ranks(h)
    assert rank0.disk is not None and rank1.disk is None
    first, again = prompts(2, prefix_blocks=8, suffix=5, seed=1)
    h.add(first)
    h.run()
    for seed in (200, 201, 202):
        (other,) = prompts(1, prefix_blocks=8, suffix=5, seed=seed)
        h.add(other)
        h.run()
    before = dict(h.stats)
    rid = h.add(again)
    h.run()
    assert h.stats["disk_promoted_blocks"] - before.get("disk_promoted_blocks", 0) >= 1
    assert h.stats["loaded_blocks"] - before["loaded_blocks"] == 8
    assert len(h.outputs[rid]) == 4
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["rank-0"]


def test_disk_blocks_survive_a_restart_with_one_scan(tiny_model_config: str, tmp_path: Path
                                                      ) -> None:
    """After a restart only rank 0 scans (one store); the scheduler adopts its blocks on that
    one report, and both ranks load them."""
    config: dict[str, Any] = {"host_bytes": 16 * SLOT_BYTES, "disk_path": str(tmp_path / "d"),
                              "disk_bytes": "4MiB"}
    (prompt,) = prompts(1, prefix_blocks=8, suffix=5, seed=600)
    first = make(tiny_model_config, **config)
    first.add(prompt)
    first.run()
    for worker in ranks(first):
        worker.shutdown()
    second = make(tiny_model_config, **config)
    rid = second.add(prompt)
    second.run()  # nothing in host: every hit comes from disk, checked on both ranks
    assert second.stats["disk_recovered_blocks"] >= 8
    assert second.stats["loaded_blocks"] >= 8
    assert len(second.outputs[rid]) == 4


def test_remote_tier_is_written_once_and_serves_both_ranks(
        tiny_model_config: str, redis_server: RedisServer) -> None:
    """Rank 0 alone talks to Redis (rank 0's keys, one copy per block); rank 1 answers its
    lookups as "all found", so rank 0's answer decides; a fresh server's two ranks both load
    the blocks rank 0 read from Redis."""
    config: dict[str, Any] = {"host_bytes": 64 * SLOT_BYTES, "remote_url": redis_server.url,
                              "remote_timeout_s": 1.0}
    (prompt,) = prompts(1, prefix_blocks=8, suffix=5, seed=1000)
    first = make(tiny_model_config, **config)
    rank0, rank1 = ranks(first)
    assert rank0.remote is not None and rank1.remote is None
    first.add(prompt)
    first.run()
    written = first.stats["remote_written_blocks"]
    assert written >= 8
    assert int(redis_server.cli("DBSIZE")) == written  # one key per block, not one per rank
    for worker in ranks(first):
        worker.shutdown()
    second = make(tiny_model_config, **config)
    rid = second.add(prompt)
    second.run()  # empty host: the prefix comes from Redis, checked on both ranks
    assert second.stats["remote_hit_blocks"] >= 8
    assert second.stats["loaded_blocks"] >= 8
    assert len(second.outputs[rid]) == 4


@pytest.mark.parametrize(("change", "once"), [
    ({}, True),
    ({"tensor_parallel_size": 1}, False),
    ({"pipeline_parallel_size": 2}, False),
    ({"decode_context_parallel_size": 2}, False),
    ({"prefill_context_parallel_size": 2}, False),
    ({"distributed_executor_backend": "ray"}, False),
    ({"distributed_executor_backend": "external_launcher"}, False),
    ({"nnodes": 2}, False),
])
def test_which_deployments_store_once(change: dict[str, Any], once: bool) -> None:
    """One copy per node only where every rank holds the same latent and maps this node's
    /dev/shm: MLA, TP>1, one pipeline stage, no context parallelism, local processes."""
    parallel = {"tensor_parallel_size": 2, "pipeline_parallel_size": 1,
                "decode_context_parallel_size": 1, "prefill_context_parallel_size": 1,
                "distributed_executor_backend": "mp", "nnodes": 1, **change}
    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(**parallel))
    mla = MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    full = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.bfloat16)
    for spec, want in ((mla, once), (full, False)):
        config = KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                               kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
        assert replicated_latent_kv(vllm_config, config) is want


def test_auto_host_bytes_for_a_shared_pool_is_bounded_by_dev_shm() -> None:
    """host_bytes='auto' with one pool per node: no more than MemAvailable or /dev/shm's free
    space (a container's default 64 MiB /dev/shm would otherwise SIGBUS a worker)."""
    import os

    from tokenvm_vllm.connector.scheduler import TokenVMScheduler
    from tokenvm_vllm.connector.worker import SHARED_POOL_DIR
    from tokenvm_vllm.transfer.host_pool import mem_available

    room = TokenVMScheduler._shared_pool_room()
    stat = os.statvfs(SHARED_POOL_DIR)
    assert 0 < room <= min(mem_available()[0], stat.f_bavail * stat.f_frsize) * 1.05
