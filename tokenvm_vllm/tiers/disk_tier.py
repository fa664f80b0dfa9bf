"""Scheduler-side bookkeeping of the disk tier: a fixed number of slots in the worker's DiskStore.

The bytes live in the worker's ``DiskStore`` (``tokenvm_vllm/tiers/disk/store.py``); this class
decides which slot holds which block, in the shared ``ResidencyIndex`` under ``Tier.DISK``, and
which block to evict when the tier is full (through an ``EvictionPolicy``). It is a ``SlotTier``
(slot_tier.py, shared with ``HostTier``) with two additions that exist because disk slots
outlive the process:

* ``adopt`` loads what ``DiskStore.scan`` found at start-up as READABLE blocks.
* ``take_freed_slots`` reports slots that lost their block (evicted, dropped, failed write, clear)
  so the worker can ``DiskStore.invalidate`` them; otherwise a restart's ``scan`` would bring back
  blocks the scheduler gave up. A slot that was freed and handed to a new ``begin_write`` before
  the caller asked is not reported: that write overwrites the header anyway, and an invalidation
  racing it could only destroy the new block.
"""

from __future__ import annotations

from collections.abc import Mapping

from tokenvm_vllm.keys import BlockKey
from tokenvm_vllm.policies import EvictionPolicy
from tokenvm_vllm.tiers.residency import BlockState, Residency, ResidencyIndex, Tier
from tokenvm_vllm.tiers.slot_tier import SlotTier


class DiskTier(SlotTier):
    """Slot allocation, pinning and eviction for ``num_slots`` disk slots."""

    tier = Tier.DISK

    def __init__(self, num_slots: int, index: ResidencyIndex, policy: EvictionPolicy) -> None:
        super().__init__(num_slots, index, policy)
        # Insertion-ordered set: slots whose old header the worker should zero.
        self._freed: dict[int, None] = {}

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

    def take_freed_slots(self) -> list[int]:
        """Slots that lost their block since the last call and are still free, oldest first.

        The worker should ``invalidate`` each (before any later write to it, which the
        ``DiskStore`` orders per slot). Each freed slot is reported at most once.
        """
        freed = list(self._freed)
        self._freed.clear()
        return freed

    def _take_free_slot(self) -> int | None:
        slot = super()._take_free_slot()
        if slot is not None:
            self._freed.pop(slot, None)  # the new write replaces the header: no invalidation
        return slot

    def _free(self, slot: int) -> None:
        super()._free(slot)
        self._freed[slot] = None
