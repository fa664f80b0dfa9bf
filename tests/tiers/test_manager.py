"""TierManager: the prepare/complete contract over the host and disk tiers, pins and counters."""

import pytest

from tokenvm_vllm.tiers.manager import DiskTransfer, TierManager
from tokenvm_vllm.tiers.residency import BlockState, Residency, Tier


def at(manager: TierManager, key: bytes, tier: Tier) -> Residency:
    residency = manager.index.get(key, tier)
    assert residency is not None, f"{key!r} is not in the {tier.value} tier"
    return residency


def stored(manager: TierManager, *keys: bytes) -> list[int]:
    """Store ``keys`` into host memory through the whole store path; returns their slots."""
    slots = []
    for key in keys:
        slot = manager.prepare_store(key)
        assert slot is not None
        slots.append(slot)
    manager.complete_store(list(keys), ok=True)
    return slots


def with_disk(host_slots: int = 4, disk_slots: int = 8) -> TierManager:
    manager = TierManager(host_slots, disk_slots, "lru")
    manager.adopt_disk({})
    return manager


def demote_all(manager: TierManager) -> list[DiskTransfer]:
    transfers = manager.prepare_demotions(limit=100)
    for transfer in transfers:
        manager.complete_demotion(transfer.key, ok=True)
    return transfers


def test_store_is_loadable_only_after_complete_store() -> None:
    manager = TierManager(4)
    slot = manager.prepare_store(b"a")
    assert manager.contains(b"a", Tier.HOST) and manager.lookup([b"a"]) == 0
    manager.complete_store([b"a"], ok=True)
    assert manager.lookup([b"a", b"b"]) == 1
    assert manager.prepare_load([b"a"]) == [slot]


def test_storing_a_resident_block_again_is_refused_without_losing_a_slot() -> None:
    manager = TierManager(2)
    stored(manager, b"a")
    with pytest.raises(KeyError, match="already in the host tier"):
        manager.prepare_store(b"a")
    assert manager.host.num_used == 1
    assert manager.prepare_store(b"b") is not None
    assert manager.host.num_used == 2 and manager.host.evictions == 0  # b took the free slot


def test_failed_store_frees_the_slot() -> None:
    manager = TierManager(1)
    manager.prepare_store(b"a")
    manager.complete_store([b"a"], ok=False)
    assert not manager.contains(b"a")
    assert manager.prepare_store(b"b") is not None  # the only slot is free again


def test_loading_block_is_pinned_and_evictions_are_counted() -> None:
    manager = TierManager(2)
    stored(manager, b"a", b"b")
    manager.prepare_load([b"a"])  # a is being copied to GPU
    assert manager.prepare_store(b"c") is not None  # evicts b, the only unpinned block
    assert not manager.contains(b"b") and manager.contains(b"a")
    assert manager.prepare_store(b"d") is None  # a read-pinned, c WRITING: nothing to evict
    assert manager.get_stats() == {"host_evicted_blocks": 1, "store_skipped_blocks": 1}
    assert manager.get_stats() == {}  # counts are per call
    manager.complete_load([b"a"], ok=True)
    assert manager.lookup([b"a"]) == 1


def test_failed_load_drops_the_host_copy() -> None:
    manager = TierManager(4)
    stored(manager, b"a", b"b")
    manager.prepare_load([b"a", b"b"])
    manager.complete_load([b"a", b"b"], ok=False)
    assert manager.lookup([b"a"]) == 0 and not manager.contains(b"b")
    assert manager.get_stats()["failed_load_blocks"] == 2


def test_prepare_load_of_an_unreadable_block_pins_nothing() -> None:
    manager = TierManager(2)
    stored(manager, b"a")
    manager.prepare_store(b"w")  # WRITING: not loadable yet
    with pytest.raises(KeyError, match="not readable in the host tier"):
        manager.prepare_load([b"a", b"w"])
    assert at(manager, b"a", Tier.HOST).readers == 0
    assert manager.evict() == 1  # a was left unpinned, so it can go


def test_stored_blocks_are_demoted_to_disk_once_the_tier_is_ready() -> None:
    manager = TierManager(4, 8, "lru")
    stored(manager, b"early")
    assert manager.prepare_demotions(limit=10) == []  # start-up scan not adopted yet
    assert not manager.has_pending_work()  # ... and the queue was dropped
    manager.adopt_disk({})
    stored(manager, b"a", b"b")
    assert manager.has_pending_work()
    transfers = manager.prepare_demotions(limit=10)
    assert [t.key for t in transfers] == [b"a", b"b"]
    assert at(manager, b"a", Tier.DISK).state is BlockState.WRITING
    assert at(manager, b"a", Tier.HOST).readers == 1  # host copy pinned while copied
    manager.complete_demotion(b"a", ok=True)
    manager.complete_demotion(b"b", ok=False)  # e.g. disk full
    assert manager.index.is_readable(b"a", Tier.DISK)
    assert not manager.contains(b"b", Tier.DISK) and manager.lookup([b"b"]) == 1
    assert at(manager, b"b", Tier.HOST).readers == 0
    stats = manager.get_stats()
    assert (stats["disk_written_blocks"], stats["disk_write_failed_blocks"]) == (1, 1)


def test_demotions_beyond_the_limit_are_skipped_and_counted() -> None:
    manager = with_disk(host_slots=8)
    stored(manager, b"a", b"b", b"c", b"d")
    assert [t.key for t in manager.prepare_demotions(limit=1)] == [b"a"]
    assert manager.get_stats()["disk_write_skipped_blocks"] == 3
    assert manager.prepare_demotions(limit=1) == []  # the rest of the queue was dropped


def test_promotions_walk_the_prefix_until_the_first_disk_miss() -> None:
    manager = with_disk(host_slots=3)
    stored(manager, b"p0", b"p1", b"p2")
    demote_all(manager)
    manager.evict(Tier.HOST)
    stored(manager, b"p1")  # back in host memory: no promotion needed
    transfers = manager.prepare_promotions([b"p0", b"p1", b"p2", b"miss", b"p3"])
    assert [t.key for t in transfers] == [b"p0", b"p2"]
    assert at(manager, b"p0", Tier.HOST).state is BlockState.WRITING
    assert at(manager, b"p0", Tier.DISK).readers == 1
    assert manager.lookup([b"p0"]) == 0
    manager.complete_promotion(b"p0", ok=True)
    manager.complete_promotion(b"p2", ok=False)  # failed verification: the disk copy is bad
    assert manager.lookup([b"p0", b"p1", b"p2"]) == 2
    assert not manager.contains(b"p2")
    assert at(manager, b"p0", Tier.DISK).readers == 0
    stats = manager.get_stats()
    assert (stats["disk_promoted_blocks"], stats["disk_read_failed_blocks"]) == (1, 1)
    freed = manager.take_freed_disk_slots()
    assert len(freed) == 1  # p2's slot: the workers must invalidate it
    assert manager.take_freed_disk_slots() == []


def test_promotions_stop_when_every_host_slot_is_pinned() -> None:
    manager = with_disk(host_slots=2)
    stored(manager, b"a", b"b")
    demote_all(manager)
    manager.evict(Tier.HOST)
    manager.prepare_store(b"x")
    manager.prepare_store(b"y")  # both host slots WRITING
    assert manager.prepare_promotions([b"a", b"b"]) == []
    assert at(manager, b"a", Tier.DISK).readers == 0


def test_adopted_disk_blocks_are_promotable_and_counted() -> None:
    manager = TierManager(2, 4, "lru")
    assert manager.prepare_promotions([b"old"]) == []  # not ready before adoption
    assert manager.adopt_disk({b"old": 3}) == 1
    assert manager.get_stats()["disk_recovered_blocks"] == 1
    (transfer,) = manager.prepare_promotions([b"old"])
    assert transfer.disk_slot == 3


def test_evict_keeps_pinned_blocks() -> None:
    manager = with_disk()
    stored(manager, b"a", b"b")
    demote_all(manager)
    manager.prepare_load([b"a"])
    assert manager.evict() == 3  # b in host, a and b on disk; a's host copy is pinned
    assert manager.lookup([b"a"]) == 1 and not manager.contains(b"b")


def test_protected_keys_are_evicted_last_under_queue_aware() -> None:
    manager = TierManager(2, policy="queue_aware")
    stored(manager, b"a", b"b")
    manager.touch([b"a"])  # b is the least recently used ...
    manager.protect([b"b"])  # ... but a queued request needs it
    stored(manager, b"c")
    assert manager.contains(b"b") and not manager.contains(b"a")
    manager.unprotect([b"b"])  # the request finished: b is unprotected, as just used
    stored(manager, b"d")
    assert manager.contains(b"b") and not manager.contains(b"c")
    stored(manager, b"e")  # and plain LRU from then on
    assert not manager.contains(b"b") and manager.contains(b"d")
