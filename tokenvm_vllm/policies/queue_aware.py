"""LRU that keeps the blocks of queued and running requests for last."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator

from tokenvm_vllm.policies.lru import LRUPolicy


class QueueAwarePolicy(LRUPolicy):
    """LRU order, but keys that pending requests will read are evicted only as a last resort.

    ``protect(keys)`` adds one reference to each key (a key listed twice gets two), ``unprotect``
    drops one; a key is protected while its count is above zero. Counts are kept whether or not
    the key is resident, and survive its eviction: a queued request still needs the block if it
    is stored again. An ``unprotect`` without a matching ``protect`` is ignored rather than
    raised, since it runs on the scheduler's hot path; callers must pair them, or counts leak.

    Resident keys live in one of two LRU orders: unprotected (``LRUPolicy._order``) and
    protected. ``candidates`` yields the unprotected ones oldest first, then the protected ones
    (evicting a block a request needs costs a recompute later, which still beats refusing the
    store). Keeping two orders makes the first victim O(1): under serving load most of the host
    tier can be protected by the requests in flight, and a single order walked past every
    protected key on each eviction. A key that stops being protected counts as just used.
    """

    def __init__(self) -> None:
        super().__init__()
        self._refs: dict[Hashable, int] = {}
        self._protected: OrderedDict[Hashable, None] = OrderedDict()
        """Resident keys with a protect reference, LRU order."""

    def insert(self, key: Hashable) -> None:
        order = self._protected if key in self._refs else self._order
        order[key] = None
        order.move_to_end(key)

    def touch(self, key: Hashable) -> None:
        for order in (self._order, self._protected):
            if key in order:
                order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)
        self._protected.pop(key, None)

    def protect(self, keys: Iterable[Hashable]) -> None:
        refs = self._refs
        for key in keys:
            count = refs.get(key, 0)
            refs[key] = count + 1
            if count == 0 and key in self._order:
                del self._order[key]
                self._protected[key] = None

    def unprotect(self, keys: Iterable[Hashable]) -> None:
        refs = self._refs
        for key in keys:
            count = refs.get(key, 0)
            if count > 1:
                refs[key] = count - 1
            elif count == 1:
                del refs[key]  # dropped at zero so the table stays as small as the queue
                if key in self._protected:
                    del self._protected[key]
                    self._order[key] = None

    def is_protected(self, key: Hashable) -> bool:
        """Whether ``key`` holds at least one protect reference."""
        return key in self._refs

    def candidates(self) -> Iterator[Hashable]:
        return itertools.chain(self._order, self._protected)

    def __len__(self) -> int:
        return len(self._order) + len(self._protected)
