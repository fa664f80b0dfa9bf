"""Scheduler-side bookkeeping shared by the tiers: a fixed number of block slots.

A ``SlotTier`` decides which slot holds which block, in the shared ``ResidencyIndex`` under its
``tier``, and which block to evict when full (through an ``EvictionPolicy``); the bytes live in
the worker. ``HostTier`` (host_tier.py) and ``DiskTier`` (disk_tier.py) are the two kinds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tokenvm_vllm.keys import BlockKey
from tokenvm_vllm.policies import EvictionPolicy
from tokenvm_vllm.tiers.residency import BlockState, Residency, ResidencyIndex, Tier


class SlotTier:
    """Slot allocation, pinning and eviction for ``num_slots`` slots of one tier."""

    tier: Tier

    def __init__(self, num_slots: int, index: ResidencyIndex, policy: EvictionPolicy) -> None:
        if num_slots <= 0:
            raise ValueError(
                f"tokenvm: {self.tier.value} tier needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.index = index
        self._resident = index.of(self.tier)
        """This tier's map in the index (read directly in the per-block loops)."""
        self.policy = policy
        self._free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        self.evictions = 0

    # -- lookups -------------------------------------------------------------------------------

    def readable_prefix(self, keys: Sequence[BlockKey]) -> int:
        """How many of ``keys``, from the first, are READABLE here."""
        resident, readable = self._resident, BlockState.READABLE
        count = 0
        for key in keys:
            residency = resident.get(key)
            if residency is None or residency.state is not readable:
                break
            count += 1
        return count

    def contains(self, key: BlockKey) -> bool:
        """Resident in any state (a WRITING block need not be stored again)."""
        return key in self._resident

    def touch(self, key: BlockKey) -> None:
        self.policy.touch(key)

    # -- reads (copies out) -----------------------------------------------------------------

    def begin_read(self, keys: Sequence[BlockKey]) -> list[int]:
        """Pin READABLE ``keys`` for a copy out; returns their slots in order. Raises
        ``KeyError`` and pins nothing if any key is not READABLE here."""
        residencies = [self._resident.get(key) for key in keys]
        for key, residency in zip(keys, residencies, strict=True):
            if residency is None or residency.state is not BlockState.READABLE:
                raise KeyError(
                    f"tokenvm: begin_read of block {key.hex()[:16]}... that is not readable in "
                    f"the {self.tier.value} tier (state "
                    f"{'absent' if residency is None else residency.state.value}): look it up "
                    f"first")
        slots = []
        for key, residency in zip(keys, residencies, strict=True):
            assert residency is not None  # checked above
            residency.readers += 1
            self.policy.touch(key)
            slots.append(residency.slot)
        return slots

    def end_read(self, keys: Sequence[BlockKey], drop: bool = False) -> None:
        """Unpin after a copy out. ``drop=True`` also frees the slots (the copy found them bad)."""
        for key in keys:
            residency = self._resident.get(key)
            if residency is None:
                continue
            residency.readers -= 1
            if drop and residency.readers == 0:
                self._release(key)

    # -- writes (copies in) ----------------------------------------------------------------

    def begin_write(self, key: BlockKey) -> int | None:
        """Reserve a slot for ``key`` (state WRITING), evicting if full. None: all slots pinned.
        Raises ``KeyError``, taking no slot, if ``key`` is already resident here."""
        if key in self._resident:
            raise KeyError(f"tokenvm: block {key.hex()[:16]}... is already in the "
                           f"{self.tier.value} tier: check contains() before writing it")
        slot = self._take_free_slot()
        if slot is None:
            return None
        self.index.add(key, self.tier, Residency(slot=slot, state=BlockState.WRITING))
        return slot

    def end_write(self, key: BlockKey, ok: bool) -> None:
        """The copy into ``key``'s slot finished; READABLE if ``ok``, else the slot is freed."""
        residency = self._resident.get(key)
        if residency is None or residency.state is not BlockState.WRITING:
            return
        if ok:
            residency.state = BlockState.READABLE
            self.policy.insert(key)
        else:
            self.index.remove(key, self.tier)
            self._free(residency.slot)

    # -- capacity ------------------------------------------------------------------------------

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free_slots)

    def clear(self) -> int:
        """Drop every unpinned block; returns how many were dropped."""
        victims = list(self._victims())  # listed first: releasing changes the policy
        for key in victims:
            self._release(key)
        return len(victims)

    def _victims(self) -> Iterator[BlockKey]:
        """Resident keys that may be evicted now (unpinned), the policy's best victim first."""
        for key in self.policy.candidates():
            assert isinstance(key, bytes)  # the policy holds only keys this tier inserted
            residency = self._resident.get(key)
            if residency is not None and not residency.pinned:
                yield key

    def _take_free_slot(self) -> int | None:
        if not self._free_slots:
            victim = next(self._victims(), None)
            if victim is None:
                return None
            self._release(victim)
            self.evictions += 1
        return self._free_slots.pop()

    def _release(self, key: BlockKey) -> None:
        residency = self.index.remove(key, self.tier)
        self.policy.remove(key)
        self._free(residency.slot)

    def _free(self, slot: int) -> None:
        self._free_slots.append(slot)
