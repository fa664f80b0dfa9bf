"""The one interface every eviction policy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator


class EvictionPolicy(ABC):
    """Orders the keys of one tier for eviction.

    Contract: the tier calls ``insert`` once when a key becomes resident, ``touch`` on every hit,
    and ``remove`` when the key leaves (evicted or dropped). ``candidates`` yields resident keys,
    best victim first; the tier skips keys it cannot evict right now (pinned by a copy) and calls
    ``remove`` on the one it takes. A policy never evicts on its own.
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
