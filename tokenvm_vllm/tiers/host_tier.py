"""Scheduler-side bookkeeping of the host-RAM tier: a fixed number of block slots.

The bytes live in the worker's ``HostPool`` (``tokenvm_vllm/transfer/host_pool.py``); this tier
decides which slot holds which block and which block to evict (all in ``SlotTier``). Every
worker's pool has the same number of slots, so one slot number names the same place on every
tensor-parallel rank.

Under memory pressure (``host_min_available_bytes``, ``tiers/host_pressure.py``) the tier
gives up its top slots: ``begin_shrink(n)`` makes only slots ``0 .. n - 1`` usable (no new
block goes above), drops the unpinned blocks above at once and each pinned one as soon as its
copy completes (a copy in flight always finishes on its slot); ``take_release`` then says
that no block is left above ``n``, and the workers may give that memory back. ``grow(n)``
makes slots usable again. Slots are handed out lowest first (``high_water``: slots above it
never held a block, so they cost no RAM). What a shrink drops follows the eviction policy: the
hottest blocks are kept, those in given-up slots moved down (``take_moves``).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenvm_vllm.keys import BlockKey
from tokenvm_vllm.policies import EvictionPolicy
from tokenvm_vllm.tiers.residency import BlockState, ResidencyIndex, Tier
from tokenvm_vllm.tiers.slot_tier import SlotTier


class HostTier(SlotTier):
    """Slot allocation, pinning and eviction for ``num_slots`` host slots, of which the first
    ``usable_slots`` may hold blocks."""

    tier = Tier.HOST

    def __init__(self, num_slots: int, index: ResidencyIndex, policy: EvictionPolicy) -> None:
        super().__init__(num_slots, index, policy)
        self.usable_slots = num_slots
        self.high_water = 0
        """One past the highest slot ever handed out since the last release: slots from here
        up were never written, so they hold no RAM."""
        self.releasing_from: int | None = None
        """A shrink's new ``usable_slots`` while blocks above it are still pinned."""
        self.shrink_dropped = 0
        """Blocks dropped because their slot was given up (counted, not reset here)."""
        self._moves: list[tuple[int, int]] = []

    # -- shrink and grow ---------------------------------------------------------------------

    def begin_shrink(self, usable: int) -> int:
        """Give up slots ``usable`` and up: no block is written there any more. The tier keeps
        its hottest unpinned blocks, as many as the kept slots hold (the policy's order:
        ``candidates`` gives the coldest first) and drops the rest now (their copies on disk,
        if any, stay); a kept block in a given-up slot moves to a free kept slot
        (``take_moves``: the workers copy it before any later copy may use it). Pinned blocks
        stay where they are; in a given-up slot they are dropped when their copy completes.
        Returns how many were dropped now. ``take_release`` says when the shrink is done."""
        if not 1 <= usable < self.usable_slots:
            raise ValueError(f"tokenvm: cannot shrink the host tier from {self.usable_slots} to "
                             f"{usable} slots")
        if self.releasing_from is not None:
            raise ValueError("tokenvm: a host tier shrink is already in progress")
        self.usable_slots = usable
        self.releasing_from = usable
        pinned_below = sum(1 for _, residency in self.index.residents(self.tier)
                           if residency.pinned and residency.slot < usable)
        coldest_first = list(self._victims())  # unpinned READABLE blocks
        keep = max(0, usable - pinned_below)
        victims = coldest_first[:max(0, len(coldest_first) - keep)]
        for key in victims:
            self._release(key)  # (a slot at or above ``usable`` is not freed: see ``_free``)
        self._free_slots = [slot for slot in self._free_slots if slot < usable]
        for key in coldest_first[len(victims):]:
            residency = self.index.get(key, self.tier)
            assert residency is not None
            if residency.slot >= usable:
                target = self._free_slots.pop()  # there is room: counted above
                self._moves.append((residency.slot, target))
                residency.slot = target
        self.shrink_dropped += len(victims)
        return len(victims)

    def take_moves(self) -> list[tuple[int, int]]:
        """(from slot, to slot) copies a shrink needs, once: the workers make them before any
        copy of the step that carries them."""
        moves, self._moves = self._moves, []
        return moves

    def pinned_above(self, slot: int) -> int:
        """Blocks in slots ``slot`` and up (all pinned while a shrink waits for them)."""
        return sum(1 for _, residency in self.index.residents(self.tier)
                   if residency.slot >= slot)

    def take_release(self) -> int | None:
        """The first slot the workers may give back now (every block above it is gone), once
        per shrink; None while a shrink waits for copies in flight, or without a shrink."""
        first = self.releasing_from
        if first is None or self.pinned_above(first):
            return None
        self.releasing_from = None
        self.high_water = min(self.high_water, first)
        return first

    def grow(self, usable: int) -> None:
        """Make slots up to ``usable`` usable again (the workers must regrow their pools first,
        in the same step's metadata). Refused while a shrink waits for copies."""
        if not self.usable_slots < usable <= self.num_slots or self.releasing_from is not None:
            raise ValueError(f"tokenvm: cannot grow the host tier from {self.usable_slots} to "
                             f"{usable} slots now")
        # Free slots are popped from the end, lowest first: the regrown ones go last.
        self._free_slots = list(range(usable - 1, self.usable_slots - 1, -1)) + self._free_slots
        self.usable_slots = usable

    @property
    def num_used(self) -> int:
        return self.usable_slots - len(self._free_slots) - (
            self.pinned_above(self.usable_slots) if self.releasing_from is not None else 0)

    # -- SlotTier hooks: a given-up slot never returns to use ---------------------------------

    def end_write(self, key: BlockKey, ok: bool) -> None:
        """As ``SlotTier.end_write``; a block whose slot was given up meanwhile is dropped.
        (Blocks sit in given-up slots only while a shrink waits for them: ``releasing_from``.)"""
        if self.releasing_from is None:
            super().end_write(key, ok)
            return
        residency = self.index.get(key, self.tier)
        if ok and residency is not None and residency.slot >= self.usable_slots:
            ok = False
            self.shrink_dropped += 1
        super().end_write(key, ok)

    def end_read(self, keys: Sequence[BlockKey], drop: bool = False) -> None:
        """As ``SlotTier.end_read``; a block in a given-up slot goes with its last reader."""
        super().end_read(keys, drop)
        if self.releasing_from is None:
            return  # no block is in a given-up slot
        for key in keys:
            residency = self.index.get(key, self.tier)
            if (residency is not None and residency.slot >= self.usable_slots
                    and residency.readers == 0 and residency.state is BlockState.READABLE):
                self._release(key)
                self.shrink_dropped += 1

    def _take_free_slot(self) -> int | None:
        slot = super()._take_free_slot()
        if slot is not None:
            self.high_water = max(self.high_water, slot + 1)
        return slot

    def _free(self, slot: int) -> None:
        if slot < self.usable_slots:
            super()._free(slot)
