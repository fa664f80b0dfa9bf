"""``RemoteMover``: moves blocks between host-pool slots and the remote tier (Redis).

The worker's only path to the remote tier. Every verb sends one pipelined batch through the
rank's ``SlotIO`` and returns at once; ``poll`` reports each block's job when its batch
answered. A host row handed to a read or write is pinned by the scheduler (WRITING, or
read-pinned) until the job is reported, so the bytes cannot change under the copy.

``SlotIO`` is the rank's ``RemoteStore`` (its own threads, deadlines, bounded queues:
``tiers/remote/store.py``) addressed by host-pool slot, in one of two places:

* ``ThreadSlotIO`` (here): the store in the worker's process (``remote_process: false``);
* ``tiers/remote/io_process.py: ProcessSlotIO``: the store in a child process that maps the
  same host pool (``remote_process: true``), so its threads never take the engine's GIL.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tokenvm_vllm.keys import BlockKey
from tokenvm_vllm.tiers.remote.store import RemoteStore, Unanswered
from tokenvm_vllm.transfer.host_pool import HostPool
from tokenvm_vllm.transfer.mover import Mover, MoveResult


@dataclass(frozen=True)
class RemoteResult(MoveResult):
    """A finished remote job. For a lookup, ``found``: how many of its keys, from the first,
    the remote tier holds (``ok`` is True even when that is 0); None for reads and writes.
    ``answered``: False when the job failed because its batch got no answer from the server
    (timed out, expired in the queue, refused, server down: ``store.Unanswered``), so the
    block may still be there; True when the server answered (a failed read: the block is gone
    or failed its checks)."""

    found: int | None = None
    answered: bool = True


class SlotIO(Protocol):
    """The remote tier by host-pool slot. Every call returns at once; its future is resolved
    exactly once, never with an exception (``RemoteStore``'s contract)."""

    @property
    def available(self) -> bool:
        """Whether calls reach the server now."""
        ...

    def contains(self, keys: Sequence[BlockKey]) -> Future[list[bool]]: ...

    def get(self, keys: Sequence[BlockKey], host_slots: Sequence[int]) -> Future[list[bool]]:
        """Each block into its host row (a row whose answer is False holds unspecified bytes)."""
        ...

    def put(self, keys: Sequence[BlockKey], host_slots: Sequence[int]) -> Future[list[bool]]:
        """Each host row (unchanged until the future is done) to the server."""
        ...

    def stats(self) -> Counter[str]:
        """Counters since the last call (``RemoteStore.stats``)."""
        ...

    def close(self) -> None: ...


class ThreadSlotIO:
    """``SlotIO`` over a ``RemoteStore`` in this process (its threads beside vLLM's)."""

    def __init__(self, store: RemoteStore, pool: HostPool) -> None:
        self.store = store
        self.pool = pool

    @property
    def available(self) -> bool:
        return self.store.available

    def contains(self, keys: Sequence[BlockKey]) -> Future[list[bool]]:
        return self.store.contains(keys)

    def get(self, keys: Sequence[BlockKey], host_slots: Sequence[int]) -> Future[list[bool]]:
        return self.store.get(keys, self._rows(host_slots))

    def put(self, keys: Sequence[BlockKey], host_slots: Sequence[int]) -> Future[list[bool]]:
        return self.store.put(keys, self._rows(host_slots))

    def _rows(self, host_slots: Sequence[int]) -> list[np.ndarray]:
        return [self.pool.buffer[slot].numpy() for slot in host_slots]

    def stats(self) -> Counter[str]:
        return self.store.stats()

    def close(self) -> None:
        self.store.close()


@dataclass
class _Batch:
    future: Future[list[bool]]
    job_ids: list[int]
    submitted: float
    lookup: bool


class RemoteMover(Mover):
    """Asynchronous block copies between host-pool slots (``slot_bytes`` each) and the
    remote tier."""

    def __init__(self, io: SlotIO, slot_bytes: int) -> None:
        self.io = io
        self.slot_bytes = slot_bytes
        self._batches: list[_Batch] = []
        self.batch_seconds: list[float] = []
        """Submit to completion seen, per batch, since the last ``take_batch_seconds``."""

    def lookup(self, job_id: int, keys: Sequence[BlockKey]) -> None:
        """Which of ``keys`` (a prefix, in order) the remote tier holds; one job."""
        self._batches.append(_Batch(self.io.contains(keys), [job_id], time.monotonic(), True))

    def read(self, job_ids: Sequence[int], keys: Sequence[BlockKey],
             host_slots: Sequence[int]) -> None:
        """Remote -> host slots; a block missing, late or failing its checks fails its job
        (late: ``answered`` False)."""
        self._batches.append(_Batch(self.io.get(keys, host_slots), list(job_ids),
                                    time.monotonic(), False))

    def write(self, job_ids: Sequence[int], keys: Sequence[BlockKey],
              host_slots: Sequence[int]) -> None:
        """Host slots -> remote, with the TTL; a block the server did not take fails its job."""
        self._batches.append(_Batch(self.io.put(keys, host_slots), list(job_ids),
                                    time.monotonic(), False))

    def poll(self) -> list[RemoteResult]:
        now = time.monotonic()
        done: list[RemoteResult] = []
        pending = []
        for batch in self._batches:
            if not batch.future.done():
                pending.append(batch)
                continue
            oks = batch.future.result()
            seconds = now - batch.submitted
            self.batch_seconds.append(seconds)
            if batch.lookup:
                found = next((i for i, ok in enumerate(oks) if not ok), len(oks))
                done.append(RemoteResult(batch.job_ids[0], True, 0, seconds, found=found))
            else:
                answered = not isinstance(oks, Unanswered)
                done.extend(RemoteResult(job_id, ok, self.slot_bytes if ok else 0, seconds,
                                         answered=answered)
                            for job_id, ok in zip(batch.job_ids, oks, strict=True))
        self._batches = pending
        return done

    def take_batch_seconds(self) -> list[float]:
        seconds, self.batch_seconds = self.batch_seconds, []
        return seconds

    def shutdown(self) -> None:
        for batch in self._batches:
            batch.future.result()
        self.io.close()
