"""Elastic GPU KV inside vLLM's real Scheduler (CPU harness, ``tests/harness.py``): the fake
forward checks every KV position it reads, so a block handed out while parked, or dropped from
vLLM's cache before its bytes were in host, shows up as ``KVMismatch`` or a wrong load."""

from __future__ import annotations

import random
import time

from tests.harness import Harness
from tokenvm_vllm.elastic.pool import ElasticPool

BLOCK = 16


def prompts(n: int, prefix_blocks: int, suffix: int, seed: int) -> list[list[int]]:
    """``n`` prompts, each with its own prefix."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(prefix_blocks * BLOCK + suffix)]
            for _ in range(n)]


def elastic_harness(make_harness, **extra) -> tuple[Harness, ElasticPool]:
    # The harness lists no KV tensors: one region per layer, 128 bytes per block (16 tokens x
    # K,V x 4 bytes). 512-byte pages make 4-block page groups of 1 KiB (a page in each of the
    # 2 layers); the floor is 2 groups (8 blocks, the null block included).
    h = make_harness(num_gpu_blocks=64, max_num_seqs=4, extra_config={
        "elastic": True, "elastic_page_bytes": 512, "gpu_kv_floor_bytes": 2048,
        "shrink_idle_s": 0.3, "host_bytes": "1MiB", **extra})
    elastic = h.connector.scheduler.elastic.pool
    assert elastic is not None and elastic.layout.block_bytes == (128, 128)
    return h, elastic


def served_burst(make_harness, seed: int, **extra) -> tuple[Harness, ElasticPool, list[list[int]]]:
    """An elastic harness (``extra``: more settings) that served a burst of 4 prompts with
    6-block prefixes of their own, to the end; the burst's prompts for revisits."""
    h, elastic = elastic_harness(make_harness, **extra)
    burst = prompts(4, prefix_blocks=6, suffix=5, seed=seed)
    for p in burst:
        h.add(p)
    h.run()
    return h, elastic, burst


def test_starts_at_the_floor_grows_for_a_burst_and_stays_exact(make_harness):
    h, elastic = elastic_harness(make_harness)
    assert elastic.usable_blocks == 8
    assert h.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == 7
    for p in prompts(4, prefix_blocks=6, suffix=5, seed=1):
        h.add(p, max_tokens=8)
    h.run()  # the fake forward checks every computed and cached position
    assert len(h.outputs) == 4 and all(len(o) == 8 for o in h.outputs.values())
    assert elastic.usable_blocks > 8
    assert h.stats["elastic_grown_groups"] >= 6
    assert h.stats["elastic_unparked_blocks"] == elastic.usable_blocks - 8
    assert elastic.usable_blocks <= 64


def test_idle_shrink_spills_to_host_and_revisits_load_exact(make_harness):
    h, elastic, burst = served_burst(make_harness, seed=2)
    peak = elastic.usable_blocks
    assert h.stats.get("loaded_blocks", 0) == 0
    time.sleep(0.4)  # idle past shrink_idle_s: no engine steps meanwhile
    for p in burst:  # revisits: the first arrival ends the idle period and shrinks
        h.add(p)
    assert h.stats.get("elastic_shrunk_groups", 0) == 0  # stats are drained by a step
    h.run()
    assert h.stats["elastic_shrunk_groups"] > 0
    assert h.stats["elastic_spilled_blocks"] >= 4 * 6 - 8  # what did not stay in the floor
    # the revisits' prefixes came back from host (loaded), exact (the forward checked them)
    assert h.stats["loaded_blocks"] >= h.stats["elastic_spilled_blocks"] - 8
    assert elastic.usable_blocks <= peak


def test_write_back_shrink_stores_blocks_before_dropping_them(make_harness):
    """write_back stores only near the eviction end of vLLM's free queue: most cached blocks are
    not in host when the idle period ends, so the shrink stores them first, steps, and only
    then drops them from vLLM's cache."""
    h, elastic, burst = served_burst(make_harness, seed=3, write_mode="write_back",
                                     write_back_lookahead_blocks=1)
    stored_before = h.stats.get("stored_blocks", 0)
    time.sleep(0.4)
    (other,) = prompts(1, prefix_blocks=1, suffix=3, seed=4)
    h.add(other, max_tokens=2)  # ends the idle period: the shrink starts with their stores
    assert elastic.shrink_pending  # asked for the stores; nothing dropped yet
    assert h.stats.get("elastic_shrunk_groups", 0) == 0
    h.run()
    assert not elastic.shrink_pending
    assert h.stats["elastic_spill_store_blocks"] > 0
    assert h.stats["stored_blocks"] >= stored_before + h.stats["elastic_spill_store_blocks"]
    assert h.stats["elastic_shrunk_groups"] > 0
    for p in burst:  # the spilled prefixes come back from host, exact
        h.add(p)
    h.run()
    assert h.stats["loaded_blocks"] >= h.stats["elastic_spilled_blocks"] - 8
    assert h.stats["elastic_spilled_blocks"] > 0


def test_while_a_request_runs_a_shrink_stores_and_drops_nothing(make_harness):
    """A request decoding at low use past ``shrink_idle_s`` is not an idle period: the cached
    prefixes of the burst before it (not in host: write_back) are neither stored for a shrink
    nor dropped. Once no request has been in the engine for ``shrink_idle_s``, the shrink
    stores them and unmaps, and the revisits load them exact."""
    h, elastic, burst = served_burst(make_harness, seed=9, write_mode="write_back",
                                     write_back_lookahead_blocks=1)
    peak = elastic.usable_blocks
    (tail,) = prompts(1, prefix_blocks=1, suffix=3, seed=10)
    h.add(tail, max_tokens=60)
    started = time.monotonic()
    while h.scheduler.has_unfinished_requests():
        h.step()
        time.sleep(0.02)  # 60 steps of ~20 ms: well past shrink_idle_s (0.3 s) at low use
    assert time.monotonic() - started > 0.6
    assert h.stats.get("elastic_spill_store_blocks", 0) == 0
    assert h.stats.get("elastic_spill_dropped_blocks", 0) == 0
    assert elastic.usable_blocks > 8  # the burst's cached groups stayed mapped
    h.run()
    time.sleep(0.4)  # now an idle period: no request at all
    h.run_idle()
    assert h.stats["elastic_spill_store_blocks"] > 0 and h.stats["elastic_shrunk_groups"] > 0
    assert elastic.usable_blocks < peak
    for p in burst:  # the spilled prefixes come back from host, exact
        h.add(p)
    h.run()
    assert h.stats["loaded_blocks"] > 0


def test_ceiling_file_lowers_the_pool_while_running(make_harness, tmp_path):
    ceiling = tmp_path / "ceiling"
    h, elastic, burst = served_burst(make_harness, seed=5, shrink_idle_s=3600,
                                     elastic_ceiling_file=str(ceiling))
    assert elastic.usable_blocks > 16
    ceiling.write_text("4KiB")  # 4 groups of 1 KiB: 16 blocks
    time.sleep(1.1)  # the file is looked at no more than once a second
    (other,) = prompts(1, prefix_blocks=1, suffix=3, seed=6)
    h.add(other, max_tokens=2)
    h.run()
    assert elastic.groups.ceiling_bytes == 4096
    assert elastic.usable_blocks <= 16
    assert h.stats["elastic_shrunk_groups"] > 0
    for p in burst:  # spilled prefixes come back from host, exact, within the ceiling
        h.add(p)
    h.run()
    assert h.stats["loaded_blocks"] > 0
    assert elastic.usable_blocks <= 16
    ceiling.write_text("lots")  # a bad value is ignored (logged)
    time.sleep(1.1)
    h.add(other, max_tokens=2)
    h.run()
    assert elastic.groups.ceiling_bytes == 4096


def test_free_memory_target_gives_groups_back_when_another_process_needs_the_device(
        make_harness, caplog):
    """``gpu_free_target_bytes`` with vLLM's real scheduler: a simulated device of 40 KiB (the
    pool's page groups are 1 KiB) shared with another process. While the other process takes
    little, the pool grows as usual; when it takes more, the pool gives idle groups back at
    once (no idle wait), cached blocks to host first, down to the floor; when it lets go, the
    pool grows again and the spilled prefixes load from host, exact."""
    h, elastic = elastic_harness(make_harness, shrink_idle_s=3600,
                                 gpu_free_target_bytes="8KiB")
    side = h.connector.scheduler.elastic
    assert side._free_probe is None  # CPU: no NVML, the setting is inert (and says so)
    assert "has no effect here" in caplog.text
    now = [0.0]
    other = [10 * 1024]
    side._free_probe = lambda: 40 * 1024 - other[0] - elastic.mapped_bytes
    side.clock = lambda: now[0]
    burst = prompts(4, prefix_blocks=6, suffix=5, seed=7)
    for p in burst:
        h.add(p)
    h.run()
    grown = elastic.mapped_bytes
    assert grown > 4096 and elastic.groups.ceiling_bytes == 16 * 1024  # not limited
    other[0] = 34 * 1024  # the other process takes memory: free < target at any size > floor
    now[0] += 1.1
    (small,) = prompts(1, prefix_blocks=1, suffix=3, seed=8)
    h.add(small, max_tokens=2)
    h.run()
    assert elastic.groups.ceiling_bytes == 2048  # the floor
    assert elastic.mapped_bytes == 2048 < grown
    assert h.stats["elastic_shrunk_groups"] > 0 and h.stats["elastic_spilled_blocks"] > 0
    other[0] = 10 * 1024  # it lets go: growth is allowed again
    now[0] += 1.1
    for p in burst:
        h.add(p)
    h.run()
    assert elastic.groups.ceiling_bytes == 16 * 1024
    assert elastic.mapped_bytes > 2048
    assert h.stats["loaded_blocks"] > 0  # the spilled prefixes came back from host


def test_one_empty_step_right_after_start_up_ends_the_warm_up_mapping(make_harness):
    """The workers map the whole range for vLLM's warm-up and trim it at their first step's
    metadata; an idle server does not step, so TokenVM asks for exactly one empty step at once
    (a second server starting on the same GPU needs that memory), then lets the engine sleep."""
    h, elastic = elastic_harness(make_harness)
    scheduler = h.connector.scheduler
    assert scheduler.elastic.warm_up_pending
    assert h.scheduler.has_requests()  # vLLM's engine steps with no request
    assert h.run_idle() == 1
    assert not scheduler.elastic.warm_up_pending and not h.scheduler.has_requests()
    assert elastic.mapped_bytes == 2048  # the start set: nothing else was asked for


def test_an_idle_engine_keeps_stepping_until_the_idle_shrink_is_done(make_harness):
    """No request arrives after the burst: TokenVM keeps vLLM's engine stepping (empty steps,
    paced) through the idle period, so the memory goes back on time, then lets it sleep."""
    h, elastic = elastic_harness(make_harness)  # shrink_idle_s 0.3
    for p in prompts(4, prefix_blocks=6, suffix=5, seed=9):
        h.add(p, max_tokens=4)
    h.run()
    grown = elastic.mapped_bytes
    assert grown > 2048 and elastic.awaiting_idle_shrink
    assert h.scheduler.has_requests()  # vLLM's engine would step again with no request
    start = time.monotonic()
    steps = h.run_idle()
    waited = time.monotonic() - start
    assert elastic.mapped_bytes == 2048 < grown  # back to the floor with no arrival
    assert h.stats["elastic_shrunk_groups"] > 0
    assert not elastic.awaiting_idle_shrink and not h.scheduler.has_requests()
    assert waited >= 0.25  # it waited out shrink_idle_s ...
    assert steps <= waited / 0.02 + 5  # ... at most one empty step per IDLE_TICK_S
