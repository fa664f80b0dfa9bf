"""The worker side's one contract for moving bytes: a ``Mover``.

The worker (``connector/worker.py``) never touches KV bytes, host-pool rows or files itself: it
hands each job of a step to the mover for that job's path and collects finished jobs from every
mover with ``poll``. Movers:

- ``CopyEngine`` (``copy_engine.py``; ``TorchCopyEngine`` on the CPU platform,
  ``CudaCopyEngine`` in ``cuda_copy_engine.py``): GPU blocks <-> host-pool slots
  (``store``/``load``/``load_layers``, plus ``fence``/``wait_layer`` for ordering);
- ``DiskMover`` (``disk_mover.py``): host-pool slots <-> this rank's disk store
  (``read``/``write``/``invalidate``).

Contract shared by all: every submit verb takes the scheduler's job id and returns at once (or
after a synchronous copy); ``poll`` never blocks and returns each submitted job exactly once,
when its bytes have fully arrived (``ok``) or the job failed (``ok=False``: the destination must
not be used); ``shutdown`` waits for every job in flight.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MoveResult:
    """A finished job. ``ok=False``: the destination bytes must not be used."""

    job_id: int
    ok: bool
    nbytes: int
    seconds: float
    """Time the move took (on the device for GPU copies, wall time for disk I/O)."""


class Mover(ABC):
    """Moves the bytes of jobs between two places, asynchronously (see the module docstring)."""

    @abstractmethod
    def poll(self) -> Sequence[MoveResult]:
        """Jobs finished since the last call, each exactly once; never blocks."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook, synchronous movers need nothing
        """Wait for every job in flight and release resources."""
