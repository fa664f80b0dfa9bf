"""TierManager's remote-tier verbs: candidates, reads into host slots, writes from host slots."""

from __future__ import annotations

from tokenvm_vllm.keys import make_block_key
from tokenvm_vllm.tiers.manager import TierManager
from tokenvm_vllm.tiers.residency import Tier


def k(i: int) -> bytes:
    return make_block_key(i.to_bytes(32, "big"))


def stored(manager: TierManager, *keys: bytes) -> None:
    for key in keys:
        assert manager.prepare_store(key) is not None
    manager.complete_store(list(keys), ok=True)


def test_no_remote_tier_means_no_candidates_and_no_queue() -> None:
    manager = TierManager(4)
    stored(manager, k(1))
    assert manager.remote_candidates([k(1), k(2)]) == []
    assert manager.prepare_remote_writes(10) == []
    assert not manager.has_pending_work()


def test_candidates_skip_host_and_disk() -> None:
    manager = TierManager(4, disk_slots=4, remote=True)
    manager.adopt_disk({k(2): 0})
    stored(manager, k(1))
    assert manager.remote_candidates([k(1), k(2), k(3), k(4)]) == [k(3), k(4)]


def test_reads_reserve_writing_slots_and_complete() -> None:
    manager = TierManager(2, remote=True)
    stored(manager, k(1))
    manager.prepare_load([k(1)])  # pinned by a load: not evictable
    reads = manager.prepare_remote_reads([k(1), k(2), k(3)])
    assert [key for key, _ in reads] == [k(2)]  # k(1) in host; then every slot is pinned
    assert manager.lookup([k(1), k(2)]) == 1  # WRITING is not loadable
    manager.complete_load([k(1)], ok=True)
    manager.complete_remote_read(k(2), ok=True)
    assert manager.lookup([k(1), k(2)]) == 2
    (read,) = manager.prepare_remote_reads([k(3)])  # evicts the LRU block
    manager.complete_remote_read(k(3), ok=False)
    assert not manager.contains(k(3))
    counts = manager.get_stats()
    assert counts["remote_hit_blocks"] == 1 and counts["remote_read_failed_blocks"] == 1


def test_writes_pin_host_copies_within_the_limit() -> None:
    manager = TierManager(8, remote=True)
    stored(manager, k(1), k(2), k(3))
    assert manager.has_pending_work()
    writes = manager.prepare_remote_writes(2)
    assert [key for key, _ in writes] == [k(1), k(2)]
    assert manager.index.get(k(1), Tier.HOST).pinned  # type: ignore[union-attr]
    manager.complete_remote_write(k(1), ok=True)
    manager.complete_remote_write(k(2), ok=False)
    assert manager.lookup([k(1), k(2)]) == 2  # host copies stay READABLE either way
    assert not manager.index.get(k(1), Tier.HOST).pinned  # type: ignore[union-attr]
    counts = manager.get_stats()
    assert counts["remote_written_blocks"] == 1 and counts["remote_write_failed_blocks"] == 1
    assert counts["remote_write_skipped_blocks"] == 1  # k(3): over the limit
    assert not manager.has_pending_work()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_blocks_the_remote_tier_holds_are_not_written_back_until_that_is_old_news() -> None:
    """A server that recomputed blocks Redis holds (its read timed out) must not send them all
    back, competing with reads on Redis's one thread; once the sighting is older than
    ``remote_known_s`` (Redis may have evicted them) they are written again."""
    clock = Clock()
    manager = TierManager(8, remote=True, remote_known_s=60.0, clock=clock)
    manager.note_in_remote([k(1), k(2), k(5)])  # a lookup found them
    stored(manager, k(1), k(2), k(3))
    assert [key for key, _ in manager.prepare_remote_writes(10)] == [k(3)]
    manager.complete_remote_write(k(3), ok=True)
    assert manager.get_stats()["remote_write_known_blocks"] == 2
    clock.now += 61  # k(5)'s sighting is too old to rely on
    stored(manager, k(5))
    assert [key for key, _ in manager.prepare_remote_writes(10)] == [k(5)]
    manager.note_in_remote([k(6)])
    (read,) = manager.prepare_remote_reads([k(6)])
    manager.complete_remote_read(k(6), ok=False)  # missing or corrupt after all: forgotten
    stored(manager, k(6))
    assert [key for key, _ in manager.prepare_remote_writes(10)] == [k(6)]
    manager.note_in_remote([k(7)])
    (read,) = manager.prepare_remote_reads([k(7)])
    manager.complete_remote_read(k(7), ok=False, gone=False)  # timed out: still there
    stored(manager, k(7))
    assert manager.prepare_remote_writes(10) == []  # its recompute is not sent again
    assert manager.get_stats()["remote_read_unanswered_blocks"] == 1


def test_the_remote_sightings_are_bounded() -> None:
    manager = TierManager(4, remote=True)
    manager.REMOTE_KNOWN_MAX = 3  # type: ignore[misc]
    manager.note_in_remote([k(i) for i in range(5)])
    assert list(manager._remote_known) == [k(2), k(3), k(4)]  # oldest forgotten first
