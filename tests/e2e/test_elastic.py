"""Elastic GPU KV end to end in the real vLLM engine on CPU (tiny Llama, std-0.02 weights).

Elastic on with a floor of 2 page groups (8 of 96 blocks): a burst of prefixes grows the pool,
the engine sits idle past ``shrink_idle_s``, then every request is sent again. The shrink at the
first revisit stores nothing new (write-through already has every full block in host), drops
the groups' cached blocks from vLLM's prefix cache and parks them, so the revisits' prefixes
come from TokenVM instead of vLLM's GPU cache; outputs are token-exact against vLLM without
TokenVM. CPU has no VMM: what shrinks is the set of blocks vLLM may use, not memory. The
workers map their reserve ahead (``elastic_map_ahead``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tokenvm_vllm.bench.prefix_reuse import Workload, run_in_subprocess

pytestmark = pytest.mark.e2e

IDLE_S = 2.0
# 8 documents x 2 questions; each prompt is 4 prefix blocks of 32 tokens plus 20 tokens. The 96
# blocks hold every prefix: without a shrink pass 2 would be served from vLLM's own cache.
WORKLOAD = Workload(documents=8, questions=2, prefix_blocks=4, suffix_tokens=20, max_tokens=16,
                    batch_size=8, pause_s=IDLE_S + 1.5)
# tiny Llama: 4 layers, 2 KV heads of 64, float32, block 32: 32 KiB per block per layer's tensor.
BLOCK_BYTES = 2 * 2 * 32 * 64 * 4
PAGE_BYTES = 4 * BLOCK_BYTES  # 4-block page groups
FLOOR_BLOCKS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory, engine_settings) -> dict:
    tmp = tmp_path_factory.mktemp("elastic")
    base = engine_settings(num_gpu_blocks=96)
    elastic = replace(base, connector="tokenvm", extra_config={
        "elastic": True, "elastic_page_bytes": PAGE_BYTES,
        # a page group is one page of each of the 4 layers' tensors
        "gpu_kv_floor_bytes": FLOOR_BLOCKS // 4 * 4 * PAGE_BYTES,
        "shrink_idle_s": IDLE_S,
        # the workers map their reserve ahead (the default-off path is covered by the
        # scheduler-level tests in tests/elastic/)
        "elastic_map_ahead": True})
    return {name: run_in_subprocess(settings, WORKLOAD, Path(tmp / f"{name}.json"))
            for name, settings in (("baseline", base), ("elastic", elastic))}


def test_elastic_outputs_equal_baseline(runs):
    base, elastic = runs["baseline"]["outputs"], runs["elastic"]["outputs"]
    assert len(base) == 2 * 16 and base.keys() == elastic.keys()
    assert sum(base[k] != elastic[k] for k in base) == 0


def test_pool_grew_for_the_burst_and_shrank_after_idle(runs):
    first, second = runs["elastic"]["pass_counters"]
    assert first.get("tokenvm:elastic_grown_groups", 0) > 0
    assert first.get("tokenvm:elastic_shrunk_groups", 0) == 0  # no idle period inside pass 1
    shrunk = second["tokenvm:elastic_shrunk_groups"] - first.get(
        "tokenvm:elastic_shrunk_groups", 0)
    parked = second["tokenvm:elastic_parked_blocks"] - first.get(
        "tokenvm:elastic_parked_blocks", 0)
    assert shrunk > 0 and parked >= 4 * shrunk  # usable blocks went down after the idle
    assert second["tokenvm:elastic_spilled_blocks"] > 0
    assert first["tokenvm:elastic_usable_blocks"] > FLOOR_BLOCKS


def test_revisits_come_from_tokenvm(runs):
    base = runs["baseline"]["counters"]
    first, second = runs["elastic"]["pass_counters"]
    external = "vllm:prompt_tokens_by_source[external_kv_transfer]"
    assert first.get(external, 0) == 0
    assert second[external] > 0
    assert second["tokenvm:loaded_blocks"] > 0
    # without a shrink the prefixes would have been vLLM's own hits, as in the baseline
    local = "vllm:prompt_tokens_by_source[local_cache_hit]"
    assert base.get(local, 0) > 0
