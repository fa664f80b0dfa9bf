"""What the host and disk tiers share (``tiers/slot_tier.py``), tested once on each."""

import pytest

from tokenvm_vllm.policies import make_policy
from tokenvm_vllm.tiers.disk_tier import DiskTier
from tokenvm_vllm.tiers.host_tier import HostTier
from tokenvm_vllm.tiers.residency import ResidencyIndex
from tokenvm_vllm.tiers.slot_tier import SlotTier


@pytest.fixture(params=[HostTier, DiskTier], ids=["host", "disk"])
def make_tier(request):
    def make(num_slots: int) -> tuple[SlotTier, ResidencyIndex]:
        index = ResidencyIndex()
        return request.param(num_slots, index, make_policy("lru")), index
    return make


def put(tier: SlotTier, key: bytes) -> int:
    slot = tier.begin_write(key)
    assert slot is not None
    tier.end_write(key, ok=True)
    return slot


def test_pinned_blocks_are_not_evicted(make_tier) -> None:
    """WRITING blocks and blocks with readers stay; the first unpinned one goes."""
    tier, index = make_tier(2)
    put(tier, b"a")
    tier.begin_write(b"b")  # WRITING: pinned
    tier.begin_read([b"a"])  # a reader: pinned
    assert tier.begin_write(b"c") is None
    tier.end_read([b"a"])
    assert tier.begin_write(b"c") is not None
    assert b"a" not in index and b"b" in index


def test_begin_read_requires_a_readable_block(make_tier) -> None:
    tier, _ = make_tier(3)
    tier.begin_write(b"a")
    with pytest.raises(KeyError):
        tier.begin_read([b"a"])
