"""``DiskMover``: moves blocks between host-pool slots and this rank's disk store.

The worker's only path to the disk tier. Reads (promotions, disk -> host slot) and writes
(demotions, host slot -> disk) run on the store's I/O threads; a host row handed to a job is
pinned by the scheduler until the job is reported finished, so the bytes cannot change under it.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

from tokenvm_vllm.tiers.disk import DiskStore
from tokenvm_vllm.transfer.host_pool import HostPool
from tokenvm_vllm.transfer.mover import Mover, MoveResult


class DiskMover(Mover):
    """Asynchronous block copies between a ``HostPool`` and a ``DiskStore`` (see ``mover.py``)."""

    def __init__(self, store: DiskStore, pool: HostPool) -> None:
        self.store = store
        self.pool = pool
        self._jobs: dict[int, tuple[Future[bool], float]] = {}

    def scan(self) -> dict[bytes, int]:
        """What the store holds from earlier runs (key -> disk slot), verified headers only."""
        return self.store.scan()

    def invalidate(self, disk_slot: int) -> None:
        """Forget a freed slot's block, so a restart cannot adopt it (fire and forget)."""
        self.store.invalidate(disk_slot)

    def read(self, job_id: int, disk_slot: int, key: bytes, host_slot: int) -> None:
        """Disk slot -> host slot; fails (``ok=False``) on a missing, stale or corrupt slot."""
        row = self.pool.buffer[host_slot].numpy()
        self._jobs[job_id] = (self.store.read(disk_slot, key, row), time.monotonic())

    def write(self, job_id: int, disk_slot: int, key: bytes, host_slot: int) -> None:
        """Host slot -> disk slot, with the header that lets a restart find and verify it."""
        row = self.pool.buffer[host_slot].numpy()
        self._jobs[job_id] = (self.store.write(disk_slot, key, row), time.monotonic())

    def poll(self) -> list[MoveResult]:
        now = time.monotonic()
        done = []
        for job_id, (future, submitted) in list(self._jobs.items()):
            if future.done():
                del self._jobs[job_id]
                done.append(MoveResult(job_id, bool(future.result()), self.pool.slot_bytes,
                                       now - submitted))
        return done

    def shutdown(self) -> None:
        for future, _ in self._jobs.values():
            future.result()
        self.store.close()
