"""``RemoteMover``: moves blocks between host-pool slots and the remote tier (Redis).

The worker's only path to the remote tier. Every verb sends one pipelined batch through the
rank's ``RemoteStore`` (its own threads, deadlines, bounded queues: ``tiers/remote/store.py``)
and returns at once; ``poll`` reports each block's job when its batch answered. A host row
handed to a read or write is pinned by the scheduler (WRITING, or read-pinned) until the job is
reported, so the bytes cannot change under the copy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

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


@dataclass
class _Batch:
    future: Future[list[bool]]
    job_ids: list[int]
    submitted: float
    lookup: bool


class RemoteMover(Mover):
    """Asynchronous block copies between a ``HostPool`` and a ``RemoteStore``."""

    def __init__(self, store: RemoteStore, pool: HostPool) -> None:
        self.store = store
        self.pool = pool
        self._batches: list[_Batch] = []
        self.batch_seconds: list[float] = []
        """Submit to completion seen, per batch, since the last ``take_batch_seconds``."""

    def lookup(self, job_id: int, keys: Sequence[BlockKey]) -> None:
        """Which of ``keys`` (a prefix, in order) the remote tier holds; one job."""
        self._batches.append(_Batch(self.store.contains(keys), [job_id], time.monotonic(), True))

    def read(self, job_ids: Sequence[int], keys: Sequence[BlockKey],
             host_slots: Sequence[int]) -> None:
        """Remote -> host slots; a block missing, late or failing its checks fails its job
        (late: ``answered`` False)."""
        rows = [self.pool.buffer[slot].numpy() for slot in host_slots]
        self._batches.append(_Batch(self.store.get(keys, rows), list(job_ids),
                                    time.monotonic(), False))

    def write(self, job_ids: Sequence[int], keys: Sequence[BlockKey],
              host_slots: Sequence[int]) -> None:
        """Host slots -> remote, with the TTL; a block the server did not take fails its job."""
        rows = [self.pool.buffer[slot].numpy() for slot in host_slots]
        self._batches.append(_Batch(self.store.put(keys, rows), list(job_ids),
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
                done.extend(RemoteResult(job_id, ok, self.pool.slot_bytes if ok else 0, seconds,
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
        self.store.close()
