"""Memory pressure at the scheduler level: vLLM's real Scheduler, TokenVM's scheduler side and
its real worker side (CPU tensors, copies lagging two steps like async GPU copies), with the
fake model that checks every KV position. The host tier shrinks while copies are in flight,
the worker releases its pool only once no copy in flight touches the released slots, revisits
stay exact (dropped blocks are recomputed), and after the pressure the tier grows back and
serves loads again.

Also: the settings' parsing and their one-line errors.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.connector.test_scheduler_level import evict_everything, prompts
from tests.harness import Harness
from tokenvm_vllm.config import TokenVMConfigError, load_config


def test_shrink_waits_for_copies_and_revisits_stay_exact(make_harness, tmp_path):
    available = tmp_path / "available"
    available.write_text("1TiB")
    h: Harness = make_harness(num_gpu_blocks=24, lagging_copies=True, max_num_seqs=1,
                              extra_config={
        "host_bytes": "32KiB",  # 128 slots of 256 bytes (all the blocks below fit); floor 16
        "host_min_available_bytes": "1GiB", "host_regrow_after_s": 0,
        "debug_host_available_file": str(available), "testing": True})
    sched = h.connector.scheduler
    assert sched.pressure is not None and sched.tiers.host.num_slots == 128
    worker = h.worker.worker
    engine = worker.engine
    slots_of: dict[int, list[int]] = {}

    def recording(op: Any) -> Any:
        def record(job_id: int, blocks: list[int], slots: list[int]) -> None:
            slots_of[job_id] = list(slots)
            op(job_id, blocks, slots)
        return record

    engine.load = recording(engine.load)
    engine.store = recording(engine.store)
    pool = worker._pool
    releases: list[int] = []
    release = pool.release

    def checked_release(first: int, stop: int | None = None) -> int:
        in_flight = [job for job, _ in [*engine.queued, *getattr(engine, "_ready", [])]]
        touching = [job for job in in_flight if any(s >= first for s in slots_of.get(job, []))]
        assert not touching, f"released slots {first}.. under copies in flight: {touching}"
        releases.append(first)
        return release(first, stop)

    pool.release = checked_release  # type: ignore[method-assign]
    moved: list[int] = []
    move = pool.move

    def recorded_move(sources: list[int], targets: list[int]) -> None:
        assert not releases, "a move after the release"
        moved.extend(sources)
        move(sources, targets)

    pool.move = recorded_move  # type: ignore[method-assign]

    docs = [prompts(2, prefix_blocks=8, suffix=5, seed=10 + d) for d in range(4)]
    for first, _ in docs:
        h.add(first)
    h.run()
    assert sched.tiers.host.high_water == 32  # the 4 prompts' 8 prefix blocks
    evict_everything(h, seed=20)
    # Pressure: the revisits below are admitted (their loads planned) in the same step the
    # shrink begins, so loads and stores are in flight on slots being given up.
    available.write_text("0")
    sched.pressure._next_check = 0.0  # (checked at most once a second: check now)
    # Doc 3 (slots 24..31) first, then doc 0 (slots 0..7), then the others: with one
    # sequence at a time, only doc 3's load is in flight when the shrink begins; doc 0 is
    # queued, protected by the queue-aware policy: among the hottest blocks kept.
    for d in (3, 0, 1, 2):
        h.add(docs[d][1])
    waited = False
    for _ in range(2000):
        if not h.scheduler.has_requests() and not h.connector.has_pending_push_work():
            break
        h.step()
        # (the fake forward checks every KV position: a dropped block must be recomputed)
        waited = waited or sched.pressure.pending
    assert releases == [16]
    # The queued docs 0, 1, 2 are the hottest (protected); 16 slots keep two of them: doc 0
    # where it is and doc 2, moved down from slots 16..23; doc 1 is dropped (recomputed).
    assert sorted(moved) == list(range(16, 24))
    assert sched.tiers.host.usable_slots == 16
    assert h.stats["host_shrinks"] == 1 and h.stats["host_shrink_dropped_blocks"] > 0
    assert waited, "no copy was in flight on the given-up slots when the shrink began"
    # Loaded: doc 3 (before its slots were given up), doc 0 and the moved doc 2, KV-exact.
    assert h.stats["loaded_blocks"] == 24
    # Relief: the tier grows back at the next check and serves revisits from host again.
    available.write_text("1TiB")
    sched.pressure._next_check = 0.0
    loaded = h.stats.get("loaded_blocks", 0)
    later = prompts(2, prefix_blocks=8, suffix=5, seed=30)
    h.add(later[0])
    h.run()
    assert h.stats["host_grows"] == 1 and sched.tiers.host.usable_slots == 128
    evict_everything(h, seed=31)
    h.add(later[1])
    h.run()
    assert h.stats["loaded_blocks"] >= loaded + 8


@pytest.mark.parametrize(("value", "expected"), [
    ("8GiB", 8 * 2**30), (0.1, 0.1), ("0.25", 0.25), (0, 0), ("1048576", 2**20)])
def test_threshold_is_a_size_or_a_fraction(value, expected):
    assert load_config({"host_min_available_bytes": value}, environ={}
                       ).host_min_available_bytes == expected


@pytest.mark.parametrize(("extra", "needle"), [
    ({"host_min_available_bytes": "lots"}, "host_min_available_bytes='lots' is not a size"),
    ({"host_min_available_bytes": "-1GiB"}, "host_min_available_bytes='-1GiB' is negative"),
    ({"host_regrow_after_s": -1}, "host_regrow_after_s=-1.0 must be between 0 and 86400"),
    ({"debug_host_available_file": "/x", "host_min_available_bytes": "1GiB"},
     "debug_host_available_file='/x' is a testing knob"),
    ({"debug_host_available_file": "/x", "testing": True},
     "is set but host_min_available_bytes is 0"),
])
def test_bad_values_name_the_key_and_value(extra, needle):
    with pytest.raises(TokenVMConfigError) as err:
        load_config(extra, environ={})
    assert needle in str(err.value) and "\n" not in str(err.value)
