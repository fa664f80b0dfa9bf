"""The residency index: the single source of truth for where each stored block lives.

Scheduler side only. Each key maps to one ``Residency`` per tier that holds a copy of it, with an
explicit state, so a slot is never handed out, evicted or overwritten while a copy touches it:

    (free) --begin_write--> WRITING --end_write(ok)--> READABLE --evict--> (free)
                               |                           |  ^
                               +--end_write(failed)--> (free)  begin_read / end_read (readers)

A READABLE slot with readers > 0 is pinned; so is every WRITING slot.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tokenvm_vllm.keys import BlockKey


class Tier(enum.Enum):
    HOST = "host"
    DISK = "disk"


class BlockState(enum.Enum):
    WRITING = "writing"
    """A copy into the slot is in flight; the bytes are not valid yet."""
    READABLE = "readable"
    """The slot holds the block's bytes."""


@dataclass
class Residency:
    """One copy of a block in one tier."""

    slot: int
    state: BlockState
    readers: int = 0
    """Copies out of this slot in flight; while > 0 the slot must not be reused."""

    @property
    def pinned(self) -> bool:
        return self.state is BlockState.WRITING or self.readers > 0


class ResidencyIndex:
    """key -> {tier -> Residency}, kept as one map per tier. Tiers mutate it; nothing else does.

    One map per tier rather than one small dict per key: the lookups that run for every block of
    every request each engine step (``SlotTier.readable_prefix``, the store planner's
    ``contains``) are then one dict probe, with no hashing of the ``Tier`` enum (a Python-level
    ``__hash__``), and a stored block costs one object, not two, to the garbage collector (on the
    CPU VM, ``bench/connector_step_cost``: the per-key dicts made a lookup 3x slower and the
    collections they caused landed in ``add``)."""

    def __init__(self) -> None:
        self._by_tier: dict[Tier, dict[BlockKey, Residency]] = {tier: {} for tier in Tier}

    def of(self, tier: Tier) -> dict[BlockKey, Residency]:
        """The live map of ``tier``'s residents, for hot read-only loops (``SlotTier``); change
        it only through ``add`` and ``remove``."""
        return self._by_tier[tier]

    def get(self, key: BlockKey, tier: Tier) -> Residency | None:
        return self._by_tier[tier].get(key)

    def is_readable(self, key: BlockKey, tier: Tier) -> bool:
        entry = self._by_tier[tier].get(key)
        return entry is not None and entry.state is BlockState.READABLE

    def add(self, key: BlockKey, tier: Tier, residency: Residency) -> None:
        placements = self._by_tier[tier]
        if key in placements:
            raise KeyError(f"tokenvm: block already resident in {tier.value}")
        placements[key] = residency

    def remove(self, key: BlockKey, tier: Tier) -> Residency:
        return self._by_tier[tier].pop(key)

    def residents(self, tier: Tier) -> list[tuple[BlockKey, Residency]]:
        """Every (key, residency) of ``tier``, in any state (a copy: for rare callers)."""
        return list(self._by_tier[tier].items())

    def __contains__(self, key: object) -> bool:
        return any(key in placements for placements in self._by_tier.values())

    def __len__(self) -> int:
        """Distinct keys resident in any tier (a scan: for rare callers)."""
        return len(set().union(*self._by_tier.values()))
