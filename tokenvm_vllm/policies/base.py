"""The one interface every eviction policy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Iterator


class EvictionPolicy(ABC):
    """Orders the keys of one tier for eviction.

    Contract: the tier calls ``insert`` once when a key becomes resident, ``touch`` on every hit,
    and ``remove`` when the key leaves (evicted or dropped). ``candidates`` yields resident keys,
    best victim first; the tier skips keys it cannot evict right now (pinned by a copy) and calls
    ``remove`` on the one it takes. A policy never evicts on its own.

    ``candidates`` is lazy: it walks the policy's live order, so finding a victim costs the keys
    examined, not the size of the tier (a snapshot of a 10,240-slot tier per eviction, hundreds
    of evictions per step, stalled vLLM's engine loop for tens of milliseconds under serving
    load). The iterator is valid only until the policy changes: take one key, then stop (or list
    the candidates first, as ``SlotTier.clear`` does).

    ``touch`` and ``remove`` of a key that is not resident are harmless no-ops, and ``insert`` of a
    resident key counts as a ``touch``. Policies are built with no arguments (``make_policy``);
    they are never told the tier's capacity up front.

    ``protect``/``unprotect`` are optional hints from the scheduler ("queued or running requests
    will read these keys"); the default implementations ignore them.
    """

    @abstractmethod
    def insert(self, key: Hashable) -> None: ...

    @abstractmethod
    def touch(self, key: Hashable) -> None: ...

    @abstractmethod
    def remove(self, key: Hashable) -> None: ...

    @abstractmethod
    def candidates(self) -> Iterator[Hashable]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def protect(self, keys: Iterable[Hashable]) -> None:  # noqa: B027 - a deliberate no-op hook
        """Hint that pending requests need ``keys`` (resident or not). Reference counted: every
        call must be matched by one ``unprotect`` of the same keys. Ignored unless overridden."""

    def unprotect(self, keys: Iterable[Hashable]) -> None:  # noqa: B027 - a deliberate no-op hook
        """Undo one earlier ``protect`` of ``keys``. Ignored unless overridden."""
