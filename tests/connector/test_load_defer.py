"""``load_defer_steps``: a load that would evict the GPU's prefix cache waits a few steps, so the
requests behind it whose prefix is on the GPU run first (vLLM's real Scheduler, CPU)."""

import pytest

from tests.connector.test_scheduler_level import evict_everything, prompts
from tests.harness import Harness
from tokenvm_vllm.config import TokenVMConfigError


def _revisit_both(h: Harness) -> tuple[str, str]:
    """P1 only in host, P2 on the GPU with little else free; then a revisit of P1 (A) and one of
    P2 (B), A first in vLLM's queue. Returns A's and B's request ids."""
    (p1,) = prompts(1, prefix_blocks=12, suffix=3, seed=1)
    (p2,) = prompts(1, prefix_blocks=12, suffix=3, seed=2)
    h.add(p1)
    h.run()
    evict_everything(h, seed=3)  # P1 now only in host
    h.add(p2)
    h.run()  # P2 cached on the GPU, the rest of the GPU the older prompts' cached blocks
    (a,) = prompts(1, prefix_blocks=12, suffix=5, seed=1)
    (b,) = prompts(1, prefix_blocks=12, suffix=6, seed=2)
    return h.add(a, max_tokens=3), h.add(b, max_tokens=3)


# An elastic pool (tests/elastic: 4-block page groups, a floor of 8 blocks) that the scenario
# grows to its ceiling, all 24 blocks: there a load must evict as in a fixed pool.
ELASTIC = {"elastic": True, "elastic_page_bytes": 512, "gpu_kv_floor_bytes": 2048}


@pytest.mark.parametrize("pool", ["fixed", "elastic"])
def test_a_load_that_would_evict_the_cache_lets_a_gpu_hit_go_first(make_harness, pool) -> None:
    outputs, loaded, deferred = {}, {}, {}
    for defer in (0, 4):
        extra = {"load_defer_steps": defer, **(ELASTIC if pool == "elastic" else {})}
        h = make_harness(num_gpu_blocks=24, extra_config=extra)
        a, b = _revisit_both(h)
        before = h.stats["loaded_blocks"]
        h.run()  # the harness's model checks every KV position it reads
        outputs[defer] = (h.outputs[a], h.outputs[b])
        loaded[defer] = h.stats["loaded_blocks"] - before
        deferred[defer] = h.stats["load_deferred"]
        if pool == "elastic":
            assert h.connector.scheduler.elastic.pool.usable_blocks == 24
    assert outputs[0] == outputs[4]
    assert deferred[0] == 0 and 1 <= deferred[4] <= 4
    # Without it A's load evicted part of P2 from the GPU and B loaded that part back.
    assert loaded[4] < loaded[0]


def test_a_load_is_not_put_off_when_nothing_else_would_run(make_harness) -> None:
    """The GPU's free blocks are all cached ones, but no other request waits: putting the load
    off would only idle a slot."""
    h = make_harness(num_gpu_blocks=24, extra_config={"load_defer_steps": 3})
    (p1,) = prompts(1, prefix_blocks=12, suffix=3, seed=1)
    h.add(p1)
    h.run()
    evict_everything(h, seed=3)
    (a,) = prompts(1, prefix_blocks=12, suffix=5, seed=1)
    req = h.add(a, max_tokens=3)
    h.run()
    assert len(h.outputs[req]) == 3
    assert h.stats["load_deferred"] == 0 and h.stats["loaded_blocks"] >= 12


@pytest.mark.parametrize(("limit", "expected"), [(1, 1), (4, 2)])
def test_each_request_is_put_off_at_most_load_defer_steps_times(
        make_harness, limit: int, expected: int) -> None:
    """Three revisits of P2 queue behind A, two run at a time: A is put off while one of them
    still waits for a slot, but never more than ``limit`` times."""
    h = make_harness(num_gpu_blocks=24, max_num_seqs=2,
                     extra_config={"load_defer_steps": limit})
    a, b = _revisit_both(h)
    more = [h.add(p, max_tokens=3)
            for p in prompts(2, prefix_blocks=12, suffix=7, seed=2)]
    h.run()
    assert h.stats["load_deferred"] == expected
    assert all(len(h.outputs[r]) == 3 for r in (a, b, *more))


def test_load_defer_max_s_bounds_the_time_a_request_is_put_off(make_harness) -> None:
    """The scenario above, where 4 allows two put-offs: with a bound in time already passed at
    the second visit (the harness's steps take far more than a nanosecond), only the first."""
    deferred = {}
    for bound in (0.0, 1e-9):
        h = make_harness(num_gpu_blocks=24, max_num_seqs=2,
                         extra_config={"load_defer_steps": 4, "load_defer_max_s": bound})
        a, b = _revisit_both(h)
        more = [h.add(p, max_tokens=3)
                for p in prompts(2, prefix_blocks=12, suffix=7, seed=2)]
        h.run()
        deferred[bound] = h.stats["load_deferred"]
        assert all(len(h.outputs[r]) == 3 for r in (a, b, *more))
    assert deferred == {0.0: 2, 1e-9: 1}


@pytest.mark.parametrize(("value", "shown"), [("-1", "-1.0"), ("nan", "nan")])
def test_load_defer_max_s_must_be_a_time(make_harness, value: str, shown: str) -> None:
    with pytest.raises(TokenVMConfigError, match=f"load_defer_max_s={shown} must be >= 0"):
        make_harness(extra_config={"load_defer_max_s": value})


def test_load_defer_steps_must_not_be_negative(make_harness) -> None:
    with pytest.raises(TokenVMConfigError, match="load_defer_steps=-1 must be >= 0"):
        make_harness(extra_config={"load_defer_steps": -1})
