"""ARC (Megiddo & Modha, FAST 2003): Adaptive Replacement Cache."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Iterator

from tokenvm_vllm.policies.base import EvictionPolicy


class ARCPolicy(EvictionPolicy):
    """ARC: balances recency (T1) against frequency (T2), steered by ghost hits.

    Lists, each in LRU order (oldest first):

    * ``T1``: resident keys seen once since they (re)entered the cache.
    * ``T2``: resident keys seen at least twice, or re-inserted from a ghost list.
    * ``B1``/``B2``: ghosts (keys only) of keys evicted from ``T1``/``T2``.

    ``p`` is the target size of ``T1``. A re-insert of a ``B1`` ghost means "T1 was too small" and
    raises ``p`` by ``max(1, |B2|/|B1|)``; a ``B2`` ghost lowers it by ``max(1, |B1|/|B2|)``.
    ``candidates`` yields ``T1``'s LRU key first when ``|T1| > p`` (or ``T2`` is empty), else
    ``T2``'s; the rest of both lists follow, for a tier that has to skip pinned keys. Ghost lists
    are trimmed so that ``|T1|+|B1| <= c`` and ``|T1|+|T2|+|B1|+|B2| <= 2c``.

    Differences from the paper, forced by the tier's interface: the tier asks for a victim
    *before* it inserts the missing key, so (1) a ghost hit adapts ``p`` one eviction late, and
    (2) the tie-break "evict from T1 when ``|T1| == p`` and the new key is in ``B2``" is lost.
    The policy cannot tell an eviction from a drop, so every ``remove`` leaves a ghost.

    Capacity ``c``: pass ``capacity`` if known. With ``None`` (what ``make_policy`` does) the
    policy uses the largest number of resident keys it has seen: a tier evicts only when full, so
    by the first eviction this equals the tier's number of slots.
    """

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity <= 0:
            raise ValueError(f"tokenvm: ARC capacity must be > 0, got {capacity}")
        self._fixed_capacity = capacity
        self._seen_capacity = 0
        self._p = 0.0
        self._t1: OrderedDict[Hashable, None] = OrderedDict()
        self._t2: OrderedDict[Hashable, None] = OrderedDict()
        self._b1: OrderedDict[Hashable, None] = OrderedDict()
        self._b2: OrderedDict[Hashable, None] = OrderedDict()

    @property
    def capacity(self) -> int:
        """``c``: the given capacity, or the resident high-water mark."""
        if self._fixed_capacity is not None:
            return self._fixed_capacity
        return max(1, self._seen_capacity)

    @property
    def p(self) -> float:
        """Current target size of ``T1`` (0 <= p <= capacity)."""
        return self._p

    def insert(self, key: Hashable) -> None:
        if key in self._t1 or key in self._t2:
            self.touch(key)
            return
        self._seen_capacity = max(self._seen_capacity, len(self) + 1)
        c = self.capacity
        if key in self._b1:
            # Ratios computed before the ghost leaves its list, as in the paper.
            self._p = min(float(c), self._p + max(1.0, len(self._b2) / len(self._b1)))
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:
            self._p = max(0.0, self._p - max(1.0, len(self._b1) / len(self._b2)))
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
        self._trim_ghosts(c)

    def _trim_ghosts(self, c: int) -> None:
        while self._b1 and len(self._t1) + len(self._b1) > c:
            self._b1.popitem(last=False)
        while len(self._t1) + len(self._t2) + len(self._b1) + len(self._b2) > 2 * c:
            if self._b2:
                self._b2.popitem(last=False)
            elif self._b1:
                self._b1.popitem(last=False)
            else:
                break  # only residents left: more than c of them is the tier's business

    def touch(self, key: Hashable) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        if key in self._t1:
            del self._t1[key]
            self._b1[key] = None
        elif key in self._t2:
            del self._t2[key]
            self._b2[key] = None
        # Moving a key to a ghost list changes no list total, so no trimming is needed here.

    def candidates(self) -> Iterator[Hashable]:
        if self._t1 and (len(self._t1) > self._p or not self._t2):
            return itertools.chain(self._t1, self._t2)
        return itertools.chain(self._t2, self._t1)

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)
