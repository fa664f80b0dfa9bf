"""``load_mode="sync"`` inside vLLM's real Scheduler (CPU), with the harness's checking forward.

A sync load is answered ``(tokens, False)`` like a layer-wise one: the request runs in the
step of its lookup. The worker queues the whole copy in ``start_load_kv`` and makes the forward
wait for it (``fence``: on CUDA the compute stream waits for the copy's event; here the copy is
synchronous, or deferred by a test engine until the fence). No per-layer hook is involved.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.connector.test_scheduler_level import (
    churn_and_revisit,
    evict_everything,
    prompts,
    revisit_steps,
)
from tests.harness import Harness, KVMismatch
from tokenvm_vllm.connector.connector import TokenVMConnector
from tokenvm_vllm.tiers.residency import Tier
from tokenvm_vllm.transfer.copy_engine import CopyEngine, CopyResult

SYNC = {"load_mode": "sync"}


class LatePollEngine(CopyEngine):
    """Copies at once (the forward after it sees the bytes, as a fenced GPU copy would) but
    reports each job done only ``polls`` polls later, as a CPU that queries a CUDA event steps
    after the copy was queued: the job, and its pinned host slots, outlive its step."""

    def __init__(self, inner: CopyEngine, polls: int = 2) -> None:
        self.inner = inner
        self.polls = polls
        self.held: list[tuple[int, CopyResult]] = []  # (polls left, result)

    def store(self, job_id: int, gpu_block_ids: list[int], host_slots: list[int]) -> None:
        self.inner.store(job_id, gpu_block_ids, host_slots)

    def load(self, job_id: int, gpu_block_ids: list[int], host_slots: list[int]) -> None:
        self.inner.load(job_id, gpu_block_ids, host_slots)

    def poll(self) -> list[CopyResult]:
        self.held.extend((self.polls, result) for result in self.inner.poll())
        done = [result for left, result in self.held if left == 0]
        self.held = [(left - 1, result) for left, result in self.held if left > 0]
        return done

    def fence(self, job_ids: set[int]) -> None:
        return  # every copy already landed (only its report is late)


def host_keys(h: Harness, req_id: str, blocks: int) -> list[Any]:
    scheduler = h.connector.scheduler
    return scheduler.block_keys(scheduler.requests[req_id], 0, blocks)


def test_sync_load_is_pinned_until_its_job_finishes(make_harness):
    """The request computes in its lookup step, while its load job stays in flight: the host
    blocks it reads stay pinned (an eviction keeps them) until the job is reported done."""
    h = make_harness(num_gpu_blocks=24, extra_config=SYNC)
    h.worker.worker.engine = LatePollEngine(h.worker.worker.engine, polls=2)
    first, again = prompts(2, prefix_blocks=8, suffix=5, seed=80)
    h.add(first)
    h.run()
    evict_everything(h, seed=81)
    rid = h.add(again, max_tokens=4)
    scheduler = h.connector.scheduler
    h.step()
    assert len(h.outputs[rid]) == 1  # prefilled (8 loaded blocks + 5 tokens) and sampled
    assert h.stats["sync_loaded_blocks"] == 8
    keys = host_keys(h, rid, 8)
    assert len(scheduler.jobs) == 1  # the load, not yet reported
    assert all(scheduler.tiers.index.get(key, Tier.HOST).pinned for key in keys)
    h.connector.reset_cache()  # drops every unpinned host block
    assert all(scheduler.tiers.contains(key, Tier.HOST) for key in keys)
    h.step()
    assert all(scheduler.tiers.index.get(key, Tier.HOST).pinned for key in keys)
    h.step()  # the second poll after the submit reports it: unpinned
    assert not any(scheduler.tiers.index.get(key, Tier.HOST).pinned for key in keys)
    h.run()
    assert len(h.outputs[rid]) == 4
    assert len(scheduler.jobs) == 0
    h.connector.reset_cache()
    assert not any(scheduler.tiers.contains(key, Tier.HOST) for key in keys)


def test_sync_loads_with_lagging_copies_stay_exact(make_harness):
    """Copies that would land two steps late: the fence before the forward must run them."""
    h = make_harness(num_gpu_blocks=20, max_num_seqs=2, lagging_copies=True, extra_config=SYNC)
    churn_and_revisit(h)
    assert h.stats["sync_loaded_blocks"] == h.stats["loaded_blocks"] > 8


def test_without_the_wait_lagging_sync_loads_corrupt_kv(make_harness, monkeypatch):
    """The test above can fail: with the forward's wait dropped, it reads blocks too early."""
    from tokenvm_vllm.connector.worker import TokenVMWorker

    monkeypatch.setattr(TokenVMWorker, "_await_sync_loads", lambda self, job_ids: None)
    h = make_harness(num_gpu_blocks=20, max_num_seqs=2, lagging_copies=True, extra_config=SYNC)
    with pytest.raises(KVMismatch):
        churn_and_revisit(h)


def test_sync_loads_need_no_layer_hooks(make_harness, caplog):
    """A model whose attention skips ``wait_for_layer_load`` still gets exact sync loads, with
    no warning (the layer-wise path would warn and fall back)."""
    import logging

    h = make_harness(num_gpu_blocks=20, max_num_seqs=2, lagging_copies=True, layer_hooks=False,
                     extra_config=SYNC)
    with caplog.at_level(logging.WARNING, logger="vllm.tokenvm"):
        churn_and_revisit(h)
    assert h.stats["sync_loaded_blocks"] > 8
    assert h.worker.worker.layer_hooks is None  # never consulted
    assert "wait_for_layer_load" not in caplog.text


def test_failed_sync_load_is_recomputed(make_harness):
    h = make_harness(num_gpu_blocks=24,
                     extra_config={**SYNC, "debug_fail_load_every": 1, "testing": True})
    revisit_steps(h, seed=60)  # the forward after the failure checks every position again
    assert h.stats["failed_load_blocks"] == 8
    # the failed blocks were dropped from the host tier, then stored again by the recompute
    assert h.stats["stored_blocks"] >= 16


def test_corrupted_sync_load_is_caught(make_harness):
    h = make_harness(num_gpu_blocks=24,
                     extra_config={**SYNC, "debug_corrupt_loads": True, "testing": True})
    with pytest.raises(KVMismatch):
        revisit_steps(h, seed=70)


def test_sync_keeps_cuda_graphs_full():
    """Only layer-wise loads need vLLM's graphs PIECEWISE (their per-layer waits)."""
    assert TokenVMConnector.requires_piecewise_for_cudagraph({"load_mode": "sync"}) is False
    assert TokenVMConnector.requires_piecewise_for_cudagraph({"load_mode": "layerwise"}) is True
