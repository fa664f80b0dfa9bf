"""HostTier + ResidencyIndex + LRU: slot states, pinning, eviction order."""

import pytest

from tokenvm_vllm.policies import LRUPolicy
from tokenvm_vllm.tiers.host_tier import HostTier
from tokenvm_vllm.tiers.residency import BlockState, ResidencyIndex, Tier


def make(num_slots=3):
    index = ResidencyIndex()
    return HostTier(num_slots, index, LRUPolicy()), index


def store(tier, key):
    slot = tier.begin_write(key)
    assert slot is not None
    tier.end_write(key, ok=True)
    return slot


def test_write_makes_readable_only_after_end_write():
    tier, index = make()
    slot = tier.begin_write(b"a")
    assert index.get(b"a", Tier.HOST).state is BlockState.WRITING
    assert tier.readable_prefix([b"a"]) == 0
    assert tier.contains(b"a")
    tier.end_write(b"a", ok=True)
    assert tier.readable_prefix([b"a"]) == 1
    assert index.get(b"a", Tier.HOST).slot == slot


def test_failed_write_frees_the_slot():
    tier, index = make(1)
    tier.begin_write(b"a")
    tier.end_write(b"a", ok=False)
    assert b"a" not in index
    assert tier.num_used == 0
    assert tier.begin_write(b"b") is not None


def test_readable_prefix_stops_at_first_miss():
    tier, _ = make()
    store(tier, b"a")
    store(tier, b"c")
    assert tier.readable_prefix([b"a", b"b", b"c"]) == 1


def test_lru_eviction_order_and_touch():
    tier, index = make(3)
    for key in (b"a", b"b", b"c"):
        store(tier, key)
    tier.touch(b"a")  # b is now the least recently used
    store(tier, b"d")
    assert b"b" not in index
    assert {b"a", b"c", b"d"} <= {k for k in (b"a", b"c", b"d") if k in index}
    assert tier.evictions == 1


def test_end_read_with_drop_frees_slot():
    tier, index = make()
    store(tier, b"a")
    tier.begin_read([b"a"])
    tier.end_read([b"a"], drop=True)
    assert b"a" not in index and tier.num_used == 0


def test_slots_are_distinct_and_reused():
    tier, _ = make(4)
    slots = [store(tier, bytes([i])) for i in range(4)]
    assert sorted(slots) == [0, 1, 2, 3]
    new = store(tier, b"x")  # evicts the oldest, reusing its slot
    assert new == slots[0]


def test_clear_keeps_pinned():
    tier, index = make()
    store(tier, b"a")
    store(tier, b"b")
    tier.begin_read([b"b"])
    assert tier.clear() == 1
    assert b"a" not in index and b"b" in index


def test_duplicate_residency_is_rejected():
    _, index = make()
    from tokenvm_vllm.tiers.residency import Residency
    index.add(b"a", Tier.HOST, Residency(0, BlockState.READABLE))
    with pytest.raises(KeyError):
        index.add(b"a", Tier.HOST, Residency(1, BlockState.READABLE))
