"""Host tier shrink and grow under memory pressure (``tiers/host_pressure.py``,
``HostTier.begin_shrink``): a shrink drops only unpinned blocks at once, never a block being
loaded or stored (those go when their copy completes, and only then is the release sent),
later lookups miss the dropped blocks (or find them on disk), no new block lands in a given-up
slot, and the tier grows back once memory stays available.

Real TierManager and HostPressure; only the clock and the available-memory reading are given.
"""

from __future__ import annotations

import pytest

from tests.tiers.test_manager import demote_all, stored, with_disk
from tokenvm_vllm.tiers.host_pressure import HostPressure
from tokenvm_vllm.tiers.manager import TierManager
from tokenvm_vllm.tiers.residency import Tier

SLOT = 1024
CHUNK = 4 * SLOT  # tests use small pinning chunks: 4 slots
MIB = 2**20


class Machine:
    """The available memory and the clock HostPressure sees."""

    def __init__(self, available: int) -> None:
        self.available = available
        self.now = 0.0

    def pressure(self, manager: TierManager, threshold: int, regrow_after_s: float = 5.0,
                 pools: int = 1) -> HostPressure:
        return HostPressure(manager.host, SLOT, pools, threshold, regrow_after_s,
                            available=lambda: self.available, clock=lambda: self.now,
                            chunk_bytes=CHUNK)

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds


def keys(n: int, tag: bytes = b"k") -> list[bytes]:
    return [tag + i.to_bytes(4, "big") for i in range(n)]


def test_shrink_drops_unpinned_blocks_and_waits_for_copies_in_flight() -> None:
    manager = TierManager(32)
    blocks = keys(32)
    slots = stored(manager, *blocks[:30])
    assert slots == list(range(30))  # lowest slots first: the top ones are the newest
    loading = manager.prepare_load([blocks[25]])  # a load out of slot 25 in flight
    storing = manager.prepare_store(blocks[30])  # a store into slot 30 in flight
    assert loading == [25] and storing == 30
    machine = Machine(available=32 * SLOT)
    # 8 slots short, + the margin (one chunk: 4 slots) = 12 of the 31 slots written: 19 kept,
    # rounded down to whole chunks -> 16
    pressure = machine.pressure(manager, threshold=40 * SLOT)
    assert pressure.step() == []  # blocks 25 and 30 are pinned: no release yet
    assert pressure.pending
    host = manager.host
    assert host.usable_slots == 16
    # The policy's order decides (LRU here): the 16 hottest unpinned blocks stay (13..29 but
    # 25, which a load pins), the 13 coldest (0..12) are dropped, and the hot blocks in the
    # given-up slots move down into the slots freed.
    for key in blocks[:13]:
        assert not manager.contains(key, Tier.HOST)
    kept = [key for key in blocks[13:30] if key != blocks[25]]
    assert manager.lookup(kept) == 16
    residencies = [manager.index.get(key, Tier.HOST) for key in kept]
    assert all(r is not None and r.slot < 16 for r in residencies)
    moves = host.take_moves()
    assert len(moves) == 13 and all(src >= 16 > dst for src, dst in moves)
    assert sorted(src for src, _ in moves) == [s for s in range(16, 30) if s != 25]
    assert host.take_moves() == []  # once
    assert manager.contains(blocks[25], Tier.HOST)  # still being read: kept until done
    # New blocks go only into the usable slots (evicting there).
    for key in keys(5, b"new"):
        slot = manager.prepare_store(key)
        assert slot is not None and slot < 16
        manager.complete_store([key], ok=True)
    manager.complete_load([blocks[25]], ok=True)
    assert not manager.contains(blocks[25], Tier.HOST)  # went with its last reader
    assert pressure.step() == []  # the store into slot 30 is still in flight
    manager.complete_store([blocks[30]], ok=True)
    assert not manager.contains(blocks[30], Tier.HOST)  # never becomes readable up there
    assert pressure.step() == [("release", 16)]
    assert not pressure.pending
    stats = Stats()
    pressure.export(stats)
    assert stats.counts["host_released_bytes"] == 16 * SLOT
    assert stats.counts["host_shrink_dropped_blocks"] == 15  # 13 + the two pinned ones
    assert stats.gauges["host_usable_bytes"] == 16 * SLOT
    again = Stats()  # nothing changed: no level is sent again
    pressure.export(again)
    assert "host_usable_bytes" not in again.gauges and not again.counts


def test_shrunk_blocks_on_disk_stay_readable_there() -> None:
    manager = with_disk(host_slots=16, disk_slots=32)
    blocks = keys(16)
    stored(manager, *blocks)
    demote_all(manager)
    machine = Machine(available=0)
    pressure = machine.pressure(manager, threshold=1 * MIB)
    assert pressure.step() == [("release", pressure.floor_slots)]
    assert manager.host.usable_slots == 2  # the floor: an eighth of 16
    assert manager.lookup(blocks[14:]) == 2  # the two hottest stay
    assert manager.lookup(blocks) == 0
    dropped = blocks[:14]
    assert all(manager.index.is_readable(key, Tier.DISK) for key in dropped)
    transfers = manager.prepare_promotions(blocks)  # they come back from disk into host
    assert transfers and all(t.host_slot < 2 for t in transfers)


def test_no_shrink_without_written_slots_and_grow_after_calm() -> None:
    manager = TierManager(64)
    machine = Machine(available=10 * MIB)
    pressure = machine.pressure(manager, threshold=20 * MIB, regrow_after_s=5.0)
    assert pressure.step() == []  # nothing written: nothing to give back
    assert manager.host.usable_slots == 64
    stored(manager, *keys(40))
    machine.tick()
    assert pressure.step() == [("release", 8)]  # the floor (a memory gap far too large)
    machine.tick(0.5)
    machine.available = 10 * 2**30
    assert pressure.step() == []  # checks at most once a second
    machine.tick(0.5)
    assert pressure.step() == []  # calm since now
    machine.tick(4.0)
    assert pressure.step() == []  # not calm for 5 s yet
    machine.tick(1.0)
    assert pressure.step() == [("grow", 64)]
    assert manager.host.usable_slots == 64
    new = keys(64, b"g")
    slots = sorted(manager.prepare_store(key) for key in new[:56])  # type: ignore[type-var]
    assert slots == list(range(8, 64))  # the regrown slots are used again


def test_memory_dipping_again_resets_the_calm_period() -> None:
    manager = TierManager(64)
    stored(manager, *keys(64))
    machine = Machine(available=0)
    pressure = machine.pressure(manager, threshold=MIB, regrow_after_s=2.0)
    assert pressure.step()[0][0] == "release"
    machine.available = 2**30
    machine.tick()
    assert pressure.step() == []
    machine.available = MIB + 1  # above the threshold, below threshold + 2 x margin
    machine.tick()
    assert pressure.step() == []
    machine.available = 2**30
    machine.tick()
    assert pressure.step() == []  # calm starts again here
    machine.tick(2)
    assert pressure.step() == [("grow", 64)]


def test_shrink_and_grow_refuse_bad_sizes() -> None:
    manager = TierManager(8)
    with pytest.raises(ValueError, match="cannot shrink the host tier from 8 to 8"):
        manager.host.begin_shrink(8)
    with pytest.raises(ValueError, match="cannot grow"):
        manager.host.grow(9)


class Stats:
    def __init__(self) -> None:
        self.counts: dict[str, float] = {}
        self.gauges: dict[str, float] = {}

    def add(self, name: str, value: float) -> None:
        self.counts[name] = self.counts.get(name, 0) + value

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value
