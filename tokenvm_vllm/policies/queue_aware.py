"""LRU that keeps the blocks of queued and running requests for last."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator

from tokenvm_vllm.policies.lru import LRUPolicy


class QueueAwarePolicy(LRUPolicy):
    """LRU order, but keys that pending requests will read are evicted only as a last resort.

    ``protect(keys)`` adds one reference to each key (a key listed twice gets two), ``unprotect``
    drops one; a key is protected while its count is above zero. Counts are kept whether or not
    the key is resident, and survive its eviction: a queued request still needs the block if it
    is stored again. An ``unprotect`` without a matching ``protect`` is ignored rather than
    raised, since it runs on the scheduler's hot path; callers must pair them, or counts leak.

    ``candidates`` yields unprotected resident keys in LRU order, then protected ones in LRU order
    (evicting a block a request needs costs a recompute later, which still beats refusing the
    store). Protection is read as the iterator advances; the key order is fixed at the call.
    """

    def __init__(self) -> None:
        super().__init__()
        self._refs: dict[Hashable, int] = {}

    def protect(self, keys: Iterable[Hashable]) -> None:
        refs = self._refs
        for key in keys:
            refs[key] = refs.get(key, 0) + 1

    def unprotect(self, keys: Iterable[Hashable]) -> None:
        refs = self._refs
        for key in keys:
            count = refs.get(key, 0)
            if count > 1:
                refs[key] = count - 1
            elif count == 1:
                del refs[key]  # dropped at zero so the table stays as small as the queue

    def is_protected(self, key: Hashable) -> bool:
        """Whether ``key`` holds at least one protect reference."""
        return key in self._refs

    def candidates(self) -> Iterator[Hashable]:
        # Snapshot of the order (cheap, in C), filtered lazily: the tier usually takes the first
        # unprotected key, so a full pass over a large tier happens only when most is protected.
        order = list(self._order)
        if not self._refs:
            return iter(order)
        return self._unprotected_first(order)

    def _unprotected_first(self, order: list[Hashable]) -> Iterator[Hashable]:
        deferred: list[Hashable] = []
        for key in order:
            if key in self._refs:
                deferred.append(key)
            else:
                yield key
        yield from deferred
