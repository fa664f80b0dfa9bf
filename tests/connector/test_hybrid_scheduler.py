"""Hybrid models (``SupportsHMA``) inside vLLM's real Scheduler with its hybrid KV cache manager:
a sliding-window layer in KV cache group 0 and a full-attention layer in group 1. The harness's
fake forward checks every position attention reads in each group (all earlier positions in the
full group, the window in the sliding-window group), so a wrong, stale or missing block in
either group raises ``KVMismatch``."""

import random

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    SlidingWindowSpec,
)

from tests.harness import LAYERS, Harness, KVMismatch
from tokenvm_vllm.keys import with_group
from tokenvm_vllm.transfer.layout import kv_cache_groups

BLOCK = 16
WINDOW = 40
"""Tokens: a request with h blocks computed keeps the window group's blocks from
(16h - 39) // 16 on, i.e. the last 3 blocks for h >= 3."""


def prompts(n: int, prefix_blocks: int, suffix: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 1000) for _ in range(prefix_blocks * BLOCK)]
    return [prefix + [rng.randrange(3, 1000) for _ in range(suffix)] for _ in range(n)]


def hybrid(make_harness, **kwargs) -> Harness:
    h = make_harness(sliding_window=WINDOW, **kwargs)
    assert [g.sliding_window for g in h.connector.scheduler.groups] == [WINDOW, None]
    return h


def evict_everything(h: Harness, seed: int) -> None:
    """Unrelated requests that take most GPU blocks, so older cached blocks are evicted."""
    for i in range(3):
        (p,) = prompts(1, h.num_gpu_blocks // 2 - 2, 1, seed=seed * 1000 + i)
        h.add(p, max_tokens=1)
        h.run()


def revisit(h: Harness, first: list[int], again: list[int]) -> None:
    h.add(first)
    h.run()
    evict_everything(h, seed=7)
    h.stats.clear()
    h.add(again)
    h.run()


def drop_from_host(h: Harness, prompt: list[int], block: int, group: int) -> None:
    """Make one group's copy of one prefix block a host miss."""
    tiers = h.connector.scheduler.tiers
    request_hashes = h._hasher(_request(h, prompt))
    key = with_group(bytes(request_hashes[block]) + bytes(4), group)
    tiers.host.begin_read([key])
    tiers.host.end_read([key], drop=True)
    assert not tiers.contains(key)


def _request(h: Harness, prompt: list[int]):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    return Request(request_id="probe", prompt_token_ids=list(prompt),
                   sampling_params=SamplingParams(max_tokens=1), pooling_params=None)


def test_revisit_loads_the_full_group_and_only_the_window(make_harness):
    h = hybrid(make_harness, num_gpu_blocks=48)
    first, again = prompts(2, prefix_blocks=8, suffix=5, seed=1)
    revisit(h, first, again)
    # 8 full-attention blocks, and in the window group the 3 blocks a request with 8 blocks
    # (128 tokens) computed keeps: 5, 6, 7 (vLLM hands null blocks for 0..4).
    assert h.stats["host_hit_blocks"] == 8
    assert h.stats["loaded_blocks"] == 8 + 3
    assert len(h.connector.scheduler.jobs) == 0


def test_a_missing_window_block_shortens_the_hit(make_harness):
    h = hybrid(make_harness, num_gpu_blocks=48)
    first, again = prompts(2, prefix_blocks=8, suffix=5, seed=2)
    h.add(first)
    h.run()
    drop_from_host(h, first, block=6, group=0)
    evict_everything(h, seed=8)
    h.stats.clear()
    h.add(again)
    h.run()
    # Hit points 7 and 8 need window block 6; at 6 the window is blocks 3, 4, 5.
    assert h.stats["host_hit_blocks"] == 6
    assert h.stats["loaded_blocks"] == 6 + 3


def test_a_missing_full_block_shortens_the_hit_for_every_group(make_harness):
    h = hybrid(make_harness, num_gpu_blocks=48)
    first, again = prompts(2, prefix_blocks=8, suffix=5, seed=3)
    h.add(first)
    h.run()
    drop_from_host(h, first, block=3, group=1)
    evict_everything(h, seed=9)
    h.stats.clear()
    h.add(again)
    h.run()
    assert h.stats["host_hit_blocks"] == 3
    assert h.stats["loaded_blocks"] == 3 + 3  # blocks 0..2 in both groups


def test_corrupted_window_block_is_caught(make_harness):
    """The comparison can fail in the window group: a flipped byte in a restored block."""
    h = hybrid(make_harness, num_gpu_blocks=48,
               extra_config={"debug_corrupt_loads": True, "testing": True})
    first, again = prompts(2, prefix_blocks=8, suffix=5, seed=4)
    with pytest.raises(KVMismatch, match=LAYERS[0]):
        revisit(h, first, again)


def test_window_blocks_freed_mid_prefill_are_fenced_and_exact(make_harness):
    """Chunked prefill (2 blocks a step) frees window blocks while the request runs; vLLM
    hands them to the other requests at once, while copies of them lag two steps behind."""
    h = hybrid(make_harness, num_gpu_blocks=48, max_num_batched_tokens=32,
               lagging_copies=True)
    group_a = prompts(3, prefix_blocks=8, suffix=5, seed=5)
    group_b = prompts(3, prefix_blocks=6, suffix=3, seed=6)
    for a, b in zip(group_a, group_b, strict=True):
        h.add(a)
        h.add(b)
    h.run()
    evict_everything(h, seed=10)
    for p in prompts(2, prefix_blocks=8, suffix=5, seed=5):
        h.add(p)
    h.run()
    assert h.stats["loaded_blocks"] > 0


@pytest.mark.parametrize("load_mode", ["async", "layerwise", "sync"])
def test_hybrid_preemption_and_revisits_stay_exact(make_harness, load_mode):
    h = hybrid(make_harness, num_gpu_blocks=32, max_num_seqs=4,
               extra_config={"load_mode": load_mode})
    rng = random.Random(11)
    docs = [prompts(1, prefix_blocks=rng.randrange(3, 9), suffix=4, seed=20 + d)[0]
            for d in range(6)]
    for _ in range(3):
        for doc in rng.sample(docs, len(docs)):
            h.add(doc, max_tokens=64)  # 4 growing requests outgrow the cache: preemptions
        h.run()
    assert h.stats["loaded_blocks"] > 0
    assert h.preemptions > 0


def test_single_group_models_keep_plain_keys(make_harness):
    h = make_harness(num_gpu_blocks=24)
    assert [g.sliding_window for g in h.connector.scheduler.groups] == [None]
    assert with_group(b"x" * 32 + bytes(4), 0) == b"x" * 32 + bytes(4)


def test_mamba_group_is_refused_with_one_line():
    full = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32)
    mamba = MambaSpec(block_size=BLOCK, shapes=((4, 8),), dtypes=(torch.float32,))
    config = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["model.layers.0.mixer"], mamba),
        KVCacheGroupSpec(["model.layers.1.self_attn.attn"], full)])
    with pytest.raises(ValueError) as err:
        kv_cache_groups(config)
    line = str(err.value)
    assert "\n" not in line
    assert "MambaSpec" in line and "model.layers.0.mixer" in line
    assert "serve this model without the TokenVM connector" in line


def test_window_groups_read_their_spec():
    window = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=1, head_size=1,
                               dtype=torch.float32, sliding_window=WINDOW)
    full = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32)
    config = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec([LAYERS[0]], window), KVCacheGroupSpec([LAYERS[1]], full)])
    sliding, dense = kv_cache_groups(config)
    assert (sliding.sliding_window, dense.sliding_window) == (WINDOW, None)
    # vLLM's SlidingWindowManager.get_num_skipped_tokens, in blocks
    assert [sliding.first_needed_block(16 * h, BLOCK) for h in range(1, 9)] == [
        0, 0, 0, 1, 2, 3, 4, 5]
    assert dense.first_needed_block(1000, BLOCK) == 0


def test_window_blocks_freed_before_a_late_store_are_not_stored(make_harness):
    """A layer-wise load defers the request's stores by a step (until the load is known good);
    by then vLLM has freed the window group's blocks below the window and may have handed
    them to another request. Storing them from the stale block ids would file that request's
    KV under this prefix's keys; a later hit whose window covers them would read it."""
    h = hybrid(make_harness, num_gpu_blocks=24, extra_config={"load_mode": "layerwise"})
    rng = random.Random(12)
    prefix = [rng.randrange(3, 1000) for _ in range(4 * BLOCK)]
    suffix = [rng.randrange(3, 1000) for _ in range(6 * BLOCK + 1)]
    h.add(prefix + [7])
    h.run()
    evict_everything(h, seed=13)
    h.stats.clear()
    long_id = h.add(prefix + suffix, max_tokens=3)
    request = h.scheduler.requests[long_id]
    while request.num_computed_tokens < request.num_prompt_tokens:
        h.step()
    assert h.stats["loaded_blocks"] == 4 + 3  # the layer-wise load of the prefix
    (other,) = prompts(1, prefix_blocks=3, suffix=1, seed=14)
    h.add(other, max_tokens=2)  # takes the window blocks the long request frees next step
    h.run()
    evict_everything(h, seed=15)
    h.stats.clear()
    # Hit point 7 would need window blocks 4, 5, 6: freed before their late store, so never
    # stored (storing them from the stale ids fails the KV check here). The hit falls back
    # to the 4 loaded blocks, whose window (1, 2, 3) came from the load.
    h.add(prefix + suffix[:3 * BLOCK] + [rng.randrange(3, 1000) for _ in range(5)])
    h.run()
    assert h.stats["host_hit_blocks"] == 4


def run_prompts(h: Harness, seeds: list[int]) -> None:
    for seed in seeds:
        (p,) = prompts(1, prefix_blocks=8, suffix=5, seed=seed)
        h.add(p)
        h.run()


def test_hybrid_blocks_go_to_disk_and_survive_a_restart(make_harness, tmp_path):
    """Each group's blocks are their own disk slots (keys carry the group); after a restart
    a revisit finds both groups' blocks again (checked exactly by the harness)."""
    # 16 host slots of one block of one group: two prompts' blocks (2 x 8 x 2) do not fit
    config = {"host_bytes": 16 * 128, "disk_path": str(tmp_path / "disk"), "disk_bytes": "4MiB"}
    first = hybrid(make_harness, num_gpu_blocks=24, extra_config=config)
    run_prompts(first, [500, 501, 502, 500])  # each prompt evicts the last from the GPU
    assert first.stats["disk_written_blocks"] >= 32
    assert first.stats["disk_promoted_blocks"] >= 8 + 3
    assert first.stats["loaded_blocks"] >= 8 + 3
    first.worker.worker.shutdown()
    second = hybrid(make_harness, num_gpu_blocks=24, extra_config=config)
    second.stats.clear()
    run_prompts(second, [501])  # nothing in host: every hit comes from disk
    assert second.stats["disk_recovered_blocks"] >= 16
    assert second.stats["loaded_blocks"] == 8 + 3


def test_hybrid_write_back_with_lagging_copies_stays_exact(make_harness):
    """Write-back copies the cached blocks at the eviction end of vLLM's free queue, window
    blocks freed mid-request among them (their pool hash names the group)."""
    h = hybrid(make_harness, num_gpu_blocks=40, max_num_seqs=2, lagging_copies=True,
               extra_config={"write_mode": "write_back"})
    rng = random.Random(21)
    docs = [prompts(1, prefix_blocks=rng.randrange(4, 9), suffix=3, seed=40 + d)[0]
            for d in range(6)]
    for _ in range(3):
        for doc in rng.sample(docs, len(docs)):
            h.add(doc, max_tokens=8)
        h.run()
    assert h.stats["stored_blocks"] > 0
    assert h.stats["loaded_blocks"] > 0
