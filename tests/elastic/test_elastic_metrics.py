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



def test_a_step_that_changes_nothing_exports_nothing():
    """Gauges go out when their level changes: an elastic server's steps that map nothing
    ship no stats, as a fixed pool's decode steps do (vLLM sends non-empty connector stats to
    the front end every step)."""
    from tokenvm_vllm.bench.elastic_step_cost import make_elastic

    _, elastic = make_elastic(layers=4, num_blocks=512)

    def step(demand: int) -> TokenVMStats:
        """One engine step as the connector drives it (a worker that keeps its reserve full
        answers at once); returns what the step exported."""
        elastic.before_alloc(demand)
        elastic.end_of_schedule(serving=True)
        _, target = elastic.take_commands()
        elastic.reported([(elastic.ledger.sent, target)])
        stats = TokenVMStats()
        elastic.export(stats)
        return stats

    first = step(0)
    assert first.data["elastic_usable_blocks"] == elastic.pool.usable_blocks
    assert "elastic_mapped_bytes" in first.data
    for _ in range(3):  # the reserve settles
        step(0)
    assert step(0).is_empty()
    before = elastic.pool.usable_blocks
    grown = step(before + 64)  # more than is usable: the pool grows
    assert grown.data["elastic_usable_blocks"] == elastic.pool.usable_blocks > before
    assert grown.data["elastic_grown_groups"] > 0
    assert grown.data["elastic_mapped_bytes"] == elastic.pool.mapped_bytes
