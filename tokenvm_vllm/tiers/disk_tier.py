"""Scheduler-side bookkeeping of the disk tier: a fixed number of slots in the worker's DiskStore.

The bytes live in the worker's ``DiskStore`` (``tokenvm_vllm/tiers/disk_store.py``); this class
decides which slot holds which block, in the shared ``ResidencyIndex`` under ``Tier.DISK``, and
which block to evict when the tier is full (through an ``EvictionPolicy``). It mirrors ``HostTier``
with two additions that exist because disk slots outlive the process:

* ``adopt`` loads what ``DiskStore.scan`` found at start-up as READABLE blocks.
* ``take_freed_slots`` reports slots that lost their block (evicted, dropped, failed write, clear)
  so the worker can ``DiskStore.invalidate`` them; otherwise a restart's ``scan`` would bring back
  blocks the scheduler gave up. A slot that was freed and handed to a new ``begin_write`` before
  the caller asked is not reported: that write overwrites the header anyway, and an invalidation
  racing it could only destroy the new block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tokenvm_vllm.keys import BlockKey
from tokenvm_vllm.policies import EvictionPolicy
from tokenvm_vllm.tiers.residency import BlockState, Residency, ResidencyIndex, Tier


class DiskTier:
    """Slot allocation, pinning and eviction for ``num_slots`` disk slots."""

    tier = Tier.DISK

    def __init__(self, num_slots: int, index: ResidencyIndex, policy: EvictionPolicy) -> None:
        if num_slots <= 0:
            raise ValueError(f"tokenvm: disk tier needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.index = index
        self.policy = policy
        self._free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        # Insertion-ordered set: slots whose old header the worker should zero.
        self._freed: dict[int, None] = {}
        self.evictions = 0

    # -- lookups -------------------------------------------------------------------------------

    def readable_prefix(self, keys: Sequence[BlockKey]) -> int:
        """How many of ``keys``, from the first, are READABLE here."""
        count = 0
        for key in keys:
            if not self.index.is_readable(key, self.tier):
                break
            count += 1
        return count

    def contains(self, key: BlockKey) -> bool:
        """Resident in any state (a WRITING block need not be stored again)."""
        return self.index.get(key, self.tier) is not None

    def touch(self, key: BlockKey) -> None:
        self.policy.touch(key)

    # -- start-up ------------------------------------------------------------------------------

    def adopt(self, recovered: Mapping[BlockKey, int]) -> int:
        """Make the blocks ``DiskStore.scan`` found READABLE; returns how many were adopted.

        Call before the first ``begin_write``. Keys are inserted into the policy in the mapping's
        order (``scan`` orders by write sequence, oldest first, so the oldest is evicted first).
        Keys already resident in this tier are skipped. A slot out of range or claimed twice is a
        caller bug and raises ``ValueError`` before anything changes.
        """
        free = set(self._free_slots)
        claimed: set[int] = set()
        for slot in recovered.values():
            if not 0 <= slot < self.num_slots:
                raise ValueError(f"tokenvm: adopted disk slot {slot} out of range")
            if slot in claimed or slot not in free:
                raise ValueError(f"tokenvm: adopted disk slot {slot} is already in use")
            claimed.add(slot)
        adopted: set[int] = set()
        for key, slot in recovered.items():
            if self.index.get(key, self.tier) is not None:
                continue
            self.index.add(key, self.tier, Residency(slot=slot, state=BlockState.READABLE))
            self.policy.insert(key)
            adopted.add(slot)
        self._free_slots = [slot for slot in self._free_slots if slot not in adopted]
        # A skipped duplicate's slot stays free but still holds a valid header: have it zeroed.
        for slot in claimed - adopted:
            self._freed[slot] = None
        return len(adopted)

    # -- reads (disk -> host) ------------------------------------------------------------------

    def begin_read(self, keys: Sequence[BlockKey]) -> list[int]:
        """Pin READABLE ``keys`` for a copy out; returns their slots in order."""
        slots = []
        for key in keys:
            residency = self.index.get(key, self.tier)
            if residency is None or residency.state is not BlockState.READABLE:
                raise KeyError("tokenvm: begin_read on a block that is not readable on disk")
            residency.readers += 1
            self.policy.touch(key)
            slots.append(residency.slot)
        return slots

    def end_read(self, keys: Sequence[BlockKey], drop: bool = False) -> None:
        """Unpin after a copy out. ``drop=True`` also frees the slots (the read found them bad)."""
        for key in keys:
            residency = self.index.get(key, self.tier)
            if residency is None:
                continue
            residency.readers -= 1
            if drop and residency.readers == 0:
                self._release(key)

    # -- writes (host -> disk) -----------------------------------------------------------------

    def begin_write(self, key: BlockKey) -> int | None:
        """Reserve a slot for ``key`` (state WRITING), evicting if full. None: all slots pinned."""
        slot = self._take_free_slot()
        if slot is None:
            return None
        self.index.add(key, self.tier, Residency(slot=slot, state=BlockState.WRITING))
        return slot

    def end_write(self, key: BlockKey, ok: bool) -> None:
        """The write into ``key``'s slot finished; READABLE if ``ok``, else the slot is freed."""
        residency = self.index.get(key, self.tier)
        if residency is None or residency.state is not BlockState.WRITING:
            return
        if ok:
            residency.state = BlockState.READABLE
            self.policy.insert(key)
        else:
            # A failed write may have left the previous block's header (or a torn new one).
            self.index.remove(key, self.tier)
            self._free(residency.slot)

    # -- capacity ------------------------------------------------------------------------------

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free_slots)

    def clear(self) -> int:
        """Drop every unpinned block; returns how many were dropped."""
        dropped = 0
        for key in list(self.policy.candidates()):
            residency = self.index.get(key, self.tier)
            if residency is not None and not residency.pinned:
                self._release(key)
                dropped += 1
        return dropped

    def take_freed_slots(self) -> list[int]:
        """Slots that lost their block since the last call and are still free, oldest first.

        The worker should ``invalidate`` each (before any later write to it, which the
        ``DiskStore`` orders per slot). Each freed slot is reported at most once.
        """
        freed = list(self._freed)
        self._freed.clear()
        return freed

    def _take_free_slot(self) -> int | None:
        if not self._free_slots:
            for key in self.policy.candidates():
                residency = self.index.get(key, self.tier)
                if residency is not None and not residency.pinned:
                    self._release(key)
                    self.evictions += 1
                    break
            else:
                return None
        slot = self._free_slots.pop()
        self._freed.pop(slot, None)  # the new write replaces the header; no invalidation needed
        return slot

    def _release(self, key: BlockKey) -> None:
        residency = self.index.remove(key, self.tier)
        self.policy.remove(key)
        self._free(residency.slot)

    def _free(self, slot: int) -> None:
        self._free_slots.append(slot)
        self._freed[slot] = None
