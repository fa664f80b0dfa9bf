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
    """key -> {tier -> Residency}. Tiers mutate it; nothing else does."""

    def __init__(self) -> None:
        self._entries: dict[BlockKey, dict[Tier, Residency]] = {}

    def get(self, key: BlockKey, tier: Tier) -> Residency | None:
        placements = self._entries.get(key)
        return None if placements is None else placements.get(tier)

    def is_readable(self, key: BlockKey, tier: Tier) -> bool:
        entry = self.get(key, tier)
        return entry is not None and entry.state is BlockState.READABLE

    def add(self, key: BlockKey, tier: Tier, residency: Residency) -> None:
        placements = self._entries.setdefault(key, {})
        if tier in placements:
            raise KeyError(f"tokenvm: block already resident in {tier.value}")
        placements[tier] = residency

    def remove(self, key: BlockKey, tier: Tier) -> Residency:
        placements = self._entries[key]
        residency = placements.pop(tier)
        if not placements:
            del self._entries[key]
        return residency

    def residents(self, tier: Tier) -> list[tuple[BlockKey, Residency]]:
        """Every (key, residency) of ``tier``, in any state (a scan: for rare callers)."""
        return [(key, placements[tier]) for key, placements in self._entries.items()
                if tier in placements]

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
