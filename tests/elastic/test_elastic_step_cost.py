"""``bench/elastic_step_cost``: the benchmark drives the real ``SchedulerElastic`` through a
burst's growth to the ceiling and then serves there (its numbers are for reading, not for
asserting; what is asserted is that it measured the phases it claims to)."""

from __future__ import annotations

from tokenvm_vllm.bench.elastic_step_cost import NUM_BLOCKS, run


def test_step_cost_reaches_the_ceiling_and_times_both_phases():
    result = run(steps=30, waiting=2, layers=4)
    growth, ceiling = result["growth"], result["at ceiling"]
    assert 1 <= growth["steps"] < 30  # the pool grew to the ceiling, a request per step
    assert ceiling["steps"] == 30
    assert ceiling["usable_blocks"] == NUM_BLOCKS  # every group mapped
    for row in (growth, ceiling):
        assert 0 < row["p50_us"] <= row["p90_us"]
        assert row["mean_us"] > 0
