"""TokenVM inside vLLM's real Scheduler (CPU), with a fake model that checks every KV position."""

import random

import pytest

from tests.harness import Harness, KVMismatch
from tokenvm_vllm.config import TokenVMConfigError

BLOCK = 16


def prompts(n: int, prefix_blocks: int, suffix: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 1000) for _ in range(prefix_blocks * BLOCK)]
    return [prefix + [rng.randrange(3, 1000) for _ in range(suffix)] for _ in range(n)]


def evict_everything(h: Harness, seed: int) -> None:
    """Run unrelated requests that need every GPU block, so older cached blocks are evicted."""
    for i in range(2):
        (p,) = prompts(1, h.num_gpu_blocks - 3, 1, seed=seed * 1000 + i)
        h.add(p, max_tokens=1)
        h.run()


def test_revisit_loads_from_host_and_kv_is_exact(make_harness):
    h = make_harness(num_gpu_blocks=24)
    first, again = prompts(2, prefix_blocks=8, suffix=5, seed=1)
    h.add(first)
    h.run()
    assert h.stats["stored_blocks"] >= 8
    evict_everything(h, seed=2)
    h.add(again)
    h.run()
    assert h.stats["loaded_blocks"] == 8
    assert h.stats["host_hit_blocks"] >= 8
    assert len(h.scheduler.connector.scheduler.jobs) == 0
    assert len(h.histograms["load_job_seconds"]) == 1  # one job for the revisit's 8 blocks
    assert len(h.histograms["store_job_seconds"]) >= 2


def test_a_prefix_another_request_is_loading_is_waited_for_not_loaded_twice(make_harness):
    """Two requests with one host-resident prefix arrive together: the second waits for the
    first's load and then hits vLLM's own cache (as vLLM native does), instead of a second
    copy of the same blocks into a second set of GPU blocks."""
    h = make_harness(num_gpu_blocks=32)
    first, a, b = prompts(3, prefix_blocks=8, suffix=5, seed=21)
    h.add(first)
    h.run()
    evict_everything(h, seed=22)
    ids = [h.add(a), h.add(b)]
    h.run()  # the fake forward checks every KV position both requests read
    assert h.stats["loaded_blocks"] == 8  # not 16
    assert h.stats["lookup_deferred_loading"] >= 1
    assert len(h.histograms["load_job_seconds"]) == 1
    assert all(len(h.outputs[i]) == 4 for i in ids)
    assert not h.connector.scheduler._loading  # nothing left marked as loading


def test_local_hit_is_not_loaded_again(make_harness):
    h = make_harness(num_gpu_blocks=64)
    a, b = prompts(2, prefix_blocks=4, suffix=5, seed=3)
    h.add(a)
    h.run()
    h.add(b)  # prefix still in vLLM's own cache
    h.run()
    assert h.stats.get("loaded_blocks", 0) == 0
    assert h.stats["stored_blocks"] == 4 + 0  # b's prefix blocks were local hits, not stored


def test_preemption_keeps_kv_exact(make_harness):
    h = make_harness(num_gpu_blocks=20, max_num_seqs=4)
    for i in range(6):
        (p,) = prompts(1, prefix_blocks=3, suffix=9, seed=100 + i)
        h.add(p, max_tokens=40)  # 4 seqs x (3+4) blocks do not fit in 20 blocks: preemption
    h.run()
    assert h.preemptions > 0
    assert len(h.outputs) == 6 and all(len(o) == 40 for o in h.outputs.values())


def test_failed_load_is_recomputed(make_harness):
    h = make_harness(num_gpu_blocks=24, extra_config={"debug_fail_load_every": 1, "testing": True})
    first, again = prompts(2, prefix_blocks=8, suffix=5, seed=5)
    h.add(first)
    h.run()
    evict_everything(h, seed=6)
    rid = h.add(again)
    h.run()  # the fake forward checks every position: recompute must restore exact values
    assert h.stats["failed_load_blocks"] == 8
    assert len(h.outputs[rid]) == 4
    # the failed blocks were dropped from the host tier, then stored again by the recompute
    assert h.stats["stored_blocks"] >= 16


def test_corrupted_load_is_caught(make_harness):
    """The harness can fail: a flipped byte in each restored block is detected."""
    h = make_harness(num_gpu_blocks=24, extra_config={"debug_corrupt_loads": True, "testing": True})
    first, again = prompts(2, prefix_blocks=8, suffix=5, seed=7)
    h.add(first)
    h.run()
    evict_everything(h, seed=8)
    h.add(again)
    with pytest.raises(KVMismatch):
        h.run()


def test_host_tier_eviction_under_pressure(make_harness):
    # 1 MiB host pool / (2 layers x 2 x 16 x 4 bytes) = 2048 slots: shrink it to force eviction
    h = make_harness(num_gpu_blocks=24, extra_config={"host_bytes": 8 * 256})
    for i in range(3):
        (p,) = prompts(1, prefix_blocks=6, suffix=3, seed=200 + i)
        h.add(p)
        h.run()
    assert h.stats["host_evicted_blocks"] > 0
    assert h.scheduler.connector.scheduler.tiers.host.num_used <= 8


def churn_and_revisit(h: Harness) -> None:
    """Short requests that each need half the GPU cache: every new one takes the blocks of one
    that just finished, while that one's stores may still be in flight. Then revisit all."""
    for _ in range(2):
        for i in range(5):
            (p,) = prompts(1, prefix_blocks=8, suffix=3, seed=300 + i)
            h.add(p, max_tokens=1)
        h.run()


def test_async_copies_are_fenced_when_blocks_are_reused(make_harness):
    """Copies that lag two steps behind still give exact KV: re-used blocks are fenced."""
    h = make_harness(num_gpu_blocks=20, max_num_seqs=2, lagging_copies=True)
    churn_and_revisit(h)
    assert h.worker.worker.engine.fenced_jobs > 0
    assert h.stats["fenced_jobs"] >= h.worker.worker.engine.fenced_jobs
    assert h.stats["loaded_blocks"] > 0


def test_without_fences_lagging_copies_corrupt_kv(make_harness, monkeypatch):
    """The fence test can fail: with fences dropped, the lagging stores copy re-used blocks."""
    from tokenvm_vllm.connector.worker import TokenVMWorker

    monkeypatch.setattr(TokenVMWorker, "handle_preemptions", lambda self, meta: None)
    h = make_harness(num_gpu_blocks=20, max_num_seqs=2, lagging_copies=True)
    with pytest.raises(KVMismatch):
        churn_and_revisit(h)


# -- disk tier ------------------------------------------------------------------------------------

def disk_harness(make_harness, disk_path, model_dir=None, **extra):
    # 16 host slots: a revisit of 8 prefix blocks after 3 other prompts must come from disk
    config = {"host_bytes": 16 * 256, "disk_path": str(disk_path), "disk_bytes": "4MiB", **extra}
    return make_harness(model_dir, num_gpu_blocks=24, extra_config=config)


def run_prompts(h, seeds, prefix_blocks=8):
    for seed in seeds:
        (p,) = prompts(1, prefix_blocks=prefix_blocks, suffix=5, seed=seed)
        h.add(p)
        h.run()


def test_disk_tier_serves_blocks_evicted_from_host(make_harness, tmp_path):
    h = disk_harness(make_harness, tmp_path / "disk")
    run_prompts(h, [500, 501, 502, 503, 500])  # 500's prefix left host long ago
    assert h.stats["disk_written_blocks"] >= 32
    assert h.stats["host_evicted_blocks"] > 0
    assert h.stats["disk_promoted_blocks"] >= 8
    assert h.stats["loaded_blocks"] >= 8


def test_disk_blocks_survive_a_restart(make_harness, tmp_path):
    first = disk_harness(make_harness, tmp_path / "disk")
    run_prompts(first, [600, 601])
    first.worker.worker.shutdown()
    second = disk_harness(make_harness, tmp_path / "disk")
    run_prompts(second, [600])  # nothing in host: every hit comes from disk, checked exactly
    assert second.stats["disk_recovered_blocks"] >= 16
    assert second.stats["disk_promoted_blocks"] >= 8
    assert second.stats["loaded_blocks"] >= 8


def test_corrupted_disk_blocks_are_misses_and_recomputed(make_harness, tmp_path):
    first = disk_harness(make_harness, tmp_path / "disk")
    run_prompts(first, [700])
    store = first.worker.worker.disk.store
    first.worker.worker.shutdown()
    for name in sorted(p.name for p in (tmp_path / "disk" / "rank-0").glob("slots-*.bin")):
        path = tmp_path / "disk" / "rank-0" / name
        data = bytearray(path.read_bytes())
        for offset in range(0, len(data), store.slot_stride):  # one bit in every payload
            data[offset + 4096 + 100] ^= 0x01
        path.write_bytes(bytes(data))
    second = disk_harness(make_harness, tmp_path / "disk")
    run_prompts(second, [700])  # the fake forward checks every position
    assert second.stats["disk_read_failed_blocks"] >= 8
    assert second.stats.get("loaded_blocks", 0) == 0


def test_other_namespace_never_sees_the_blocks(make_harness, tmp_path):
    first = disk_harness(make_harness, tmp_path / "disk")
    run_prompts(first, [800])
    first.worker.worker.shutdown()
    from tokenvm_vllm.tiny_llama import write_tiny_llama

    other_model = str(write_tiny_llama(tmp_path / "other-model", weights=False))
    second = disk_harness(make_harness, tmp_path / "disk", model_dir=other_model)
    run_prompts(second, [800])
    assert second.stats.get("disk_recovered_blocks", 0) == 0
    assert second.stats.get("loaded_blocks", 0) == 0


def test_cache_salt_isolates_blocks(make_harness):
    h = make_harness(num_gpu_blocks=24)
    (p,) = prompts(1, prefix_blocks=8, suffix=5, seed=900)
    h.add(p, cache_salt="tenant-a")
    h.run()
    evict_everything(h, seed=901)
    h.add(p, cache_salt="tenant-b")
    h.run()
    assert h.stats.get("loaded_blocks", 0) == 0
    h.add(p, cache_salt="tenant-a")
    h.run()
    assert h.stats["loaded_blocks"] >= 7


def test_full_disk_keeps_serving_and_warns_once(make_harness, tmp_path, monkeypatch, caplog):
    import errno
    import logging
    import os

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    h = disk_harness(make_harness, tmp_path / "disk")
    monkeypatch.setattr(os, "pwrite", no_space)
    monkeypatch.setattr(os, "pwritev", no_space, raising=False)
    with caplog.at_level(logging.WARNING, logger="vllm.tokenvm"):
        run_prompts(h, [1000, 1001, 1000])
    assert h.stats["disk_write_failed_blocks"] >= 16
    assert len(h.outputs) == 3
    warnings = [r for r in caplog.records
                if "ENOSPC" in r.getMessage() or "space" in r.getMessage()]
    assert len(warnings) == 1


def test_bad_disk_path_is_one_clear_error(make_harness, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    # caught while the settings are read, before any store is opened: one line naming the key
    with pytest.raises(TokenVMConfigError, match=f"disk_path='{not_a_dir}' is not a directory"
                       ) as info:
        disk_harness(make_harness, not_a_dir)
    assert "\n" not in str(info.value)


def test_prefetch_defers_lookup_until_disk_reads_land(make_harness, tmp_path):
    first = disk_harness(make_harness, tmp_path / "disk")
    run_prompts(first, [1100])
    first.worker.worker.shutdown()
    second = disk_harness(make_harness, tmp_path / "disk")
    run_prompts(second, [1100])
    assert second.stats["lookup_deferred"] >= 1
    assert second.stats["loaded_blocks"] >= 8
    assert second.stats["prefetch_late_blocks"] + second.stats.get(
        "prefetch_on_time_blocks", 0) >= 8
    assert len(second.histograms["disk_io_seconds"]) >= 8


# -- write-back and policies ----------------------------------------------------------------------

def test_write_back_copies_only_blocks_near_eviction(make_harness):
    """Revisiting from the GPU cache costs write-back no copies; write-through copies all."""
    stored = {}
    for mode in ("write_through", "write_back"):
        h = make_harness(num_gpu_blocks=64,
                    extra_config={"write_mode": mode, "write_back_lookahead_blocks": 8})
        (p,) = prompts(1, prefix_blocks=8, suffix=5, seed=1200)
        for _ in range(3):
            h.add(p)
            h.run()
        stored[mode] = h.stats.get("stored_blocks", 0)
    assert stored["write_through"] >= 8
    assert stored["write_back"] < stored["write_through"]


def test_write_back_with_lagging_copies_stays_exact(make_harness):
    h = make_harness(num_gpu_blocks=20, max_num_seqs=2, lagging_copies=True,
                extra_config={"write_mode": "write_back"})
    churn_and_revisit(h)
    assert h.stats["stored_blocks"] > 0
    assert h.stats["loaded_blocks"] > 0


@pytest.mark.parametrize("policy", ["lru", "2q", "arc", "queue_aware"])
def test_every_policy_serves_exact_kv(make_harness, policy):
    h = make_harness(num_gpu_blocks=24,
                extra_config={"policy": policy, "host_bytes": 26 * 256})
    # 5 prompts x 6 full blocks overflow both the GPU cache (23) and the host tier (26); 1301 has
    # left the GPU cache but is still in host memory under every policy
    run_prompts(h, [1300, 1301, 1302, 1303, 1304, 1301], prefix_blocks=6)
    assert h.stats["host_evicted_blocks"] > 0
    assert h.stats.get("loaded_blocks", 0) > 0


def test_write_back_settles_with_a_tiny_host_tier(make_harness, tmp_path):
    """A look-ahead window larger than the host tier must not copy blocks in circles: the run
    ends (Harness.run raises if copies keep the engine stepping) with bounded copies."""
    for extra in ({}, {"disk_path": str(tmp_path / "disk"), "disk_bytes": "4MiB"}):
        h = make_harness(num_gpu_blocks=64,
                    extra_config={"write_mode": "write_back", "host_bytes": 6 * 256, **extra})
        run_prompts(h, [1400, 1401, 1402, 1403], prefix_blocks=8)
        for _ in range(20):
            h.step()  # idle steps: nothing new to copy
        assert not h.connector.has_pending_push_work()
        assert h.stats["stored_blocks"] <= 4 * 9


# -- layer-wise loads (load_mode="layerwise") ----------------------------------------------------

LAYERWISE = {"load_mode": "layerwise"}


def revisit_steps(h: Harness, seed: int) -> int:
    """Engine steps a revisit takes when its 8-block prefix was evicted from the GPU cache."""
    first, again = prompts(2, prefix_blocks=8, suffix=5, seed=seed)
    h.add(first)
    h.run()
    evict_everything(h, seed=seed + 1)
    before = h.steps
    rid = h.add(again, max_tokens=4)
    h.run()
    assert len(h.outputs[rid]) == 4
    return h.steps - before


@pytest.mark.parametrize("mode", ["layerwise", "sync"])
def test_in_step_load_runs_the_request_in_its_lookup_step(make_harness, mode):
    """layerwise and sync: no step spent parked while the copy runs; only layerwise needs the
    per-layer hooks (sync makes the forward wait once, before it starts)."""
    parked = make_harness(num_gpu_blocks=24)
    in_step = make_harness(num_gpu_blocks=24, extra_config={"load_mode": mode})
    parked_steps = revisit_steps(parked, seed=40)
    in_step_steps = revisit_steps(in_step, seed=40)
    assert in_step.stats["loaded_blocks"] == parked.stats["loaded_blocks"] == 8
    assert in_step_steps == parked_steps - 1
    assert bool(in_step.worker.worker.layer_hooks) is (mode == "layerwise")
    assert in_step.stats.get("sync_loaded_blocks", 0) == (8 if mode == "sync" else 0)
    assert len(in_step.scheduler.connector.scheduler.jobs) == 0


def test_layerwise_loads_with_lagging_copies_stay_exact(make_harness):
    """Copies that land two steps late: each layer's wait must hold the forward back."""
    h = make_harness(num_gpu_blocks=20, max_num_seqs=2, lagging_copies=True,
                extra_config=LAYERWISE)
    churn_and_revisit(h)
    assert h.worker.worker.layer_hooks is True
    # the first load is awaited whole (are the hooks there?), the later ones layer by layer
    assert 0 < h.stats["layerwise_loaded_blocks"] < h.stats["loaded_blocks"]


def test_without_layer_waits_lagging_layerwise_loads_corrupt_kv(make_harness, monkeypatch):
    """The test above can fail: with wait_layer dropped, the forward reads blocks too early."""
    from tests.harness import LaggingCopyEngine

    monkeypatch.setattr(LaggingCopyEngine, "wait_layer", lambda self, job_ids, layer: None)
    h = make_harness(num_gpu_blocks=20, max_num_seqs=2, lagging_copies=True,
                extra_config=LAYERWISE)
    with pytest.raises(KVMismatch):
        churn_and_revisit(h)


def test_layerwise_loads_without_layer_hooks_wait_for_the_whole_copy(make_harness, caplog):
    import logging

    h = make_harness(num_gpu_blocks=20, max_num_seqs=2, lagging_copies=True,
                layer_hooks=False, extra_config=LAYERWISE)
    with caplog.at_level(logging.WARNING, logger="vllm.tokenvm"):
        churn_and_revisit(h)  # exact: every load is awaited whole before the forward
    assert h.stats["loaded_blocks"] > 8
    assert h.worker.worker.layer_hooks is False
    assert h.stats["layerwise_loaded_blocks"] == 0
    assert "wait_for_layer_load for 0 of 2 layers" in caplog.text


def test_layerwise_step_missing_its_hooks_is_recomputed(make_harness):
    h = make_harness(num_gpu_blocks=24, extra_config=LAYERWISE)
    revisit_steps(h, seed=50)
    assert h.worker.worker.layer_hooks is True
    h.layer_hooks = False  # from now on the forward never waits
    revisit_steps(h, seed=52)
    assert h.worker.worker.layer_hooks is False  # its blocks went back to vLLM as load errors
    assert h.stats["loaded_blocks"] == 16


def test_failed_layerwise_load_is_recomputed(make_harness):
    h = make_harness(num_gpu_blocks=24,
                extra_config={**LAYERWISE, "debug_fail_load_every": 1, "testing": True})
    revisit_steps(h, seed=60)  # the forward after the failure checks every position again
    assert h.stats["failed_load_blocks"] == 8


def test_corrupted_layerwise_load_is_caught(make_harness):
    h = make_harness(num_gpu_blocks=24,
                extra_config={**LAYERWISE, "debug_corrupt_loads": True, "testing": True})
    with pytest.raises(KVMismatch):
        revisit_steps(h, seed=70)
