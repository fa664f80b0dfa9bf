"""The elastic gauges on TokenVM's stats path: levels (latest wins), not sums."""

from __future__ import annotations

from tokenvm_vllm.connector.stats import TokenVMStats


def test_gauges_keep_the_latest_level_and_counters_add():
    first = TokenVMStats()
    assert first.is_empty()
    first.set("elastic_usable_blocks", 52)
    first.add("elastic_shrunk_groups", 2)
    assert not first.is_empty()  # a level alone is worth reporting
    later = TokenVMStats()
    later.set("elastic_usable_blocks", 8)
    later.add("elastic_shrunk_groups", 3)
    total = first.aggregate(later)
    assert total.data["elastic_usable_blocks"] == 8
    assert total.data["elastic_shrunk_groups"] == 5
    assert total.reduce()["elastic_usable_blocks"] == 8
    silent = TokenVMStats()  # an interval that reported no level keeps the last one
    assert total.aggregate(silent).data["elastic_usable_blocks"] == 8
    assert "elastic_usable_blocks" not in TokenVMStats().reduce()
