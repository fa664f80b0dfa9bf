"""The job table: every copy the workers have been asked for and not all finished, and fences.

A *job* is one batch of block copies with one id, carried out by every worker (tensor-parallel
rank) and reported finished by each. Ids and kinds are defined here for both sides: the
scheduler side plans jobs and sends their ids in ``TokenVMConnectorMetadata``; the worker side
reports them in ``TokenVMWorkerMetadata.completed`` / ``failed`` (it may keep its own per-job
data, keyed by the same ``JobId``).

Life of a job (scheduler side, ``JobTable``)::

    add() --> PLANNED --send()--> IN_FLIGHT --report() by every worker--> removed, returned
                                                                            DONE or FAILED

PLANNED: created this step, not yet in a metadata the workers received. IN_FLIGHT: the workers
may be copying. A job FAILED if any worker reported it failed; the caller's ``complete_*``
decides what a failure means for the tiers.

Fences: a copy may still read or write a GPU block after vLLM freed it (its request finished or
was preempted while the copy ran). The table tracks every unfinished job's GPU blocks; when vLLM
hands such a block to a request again (``reallocated``), every IN_FLIGHT job on it must finish
before the step's forward writes there, so ``send`` returns those jobs and the worker fences
them. A PLANNED job is never fenced: this step's own loads target re-allocated blocks on purpose,
and this step's store is queued after the forward.

Pure Python, no vLLM imports: the worker side may import it.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from tokenvm_vllm.keys import BlockKey

JobId = int
"""A job's id: unique per scheduler, increasing in creation order."""


class JobKind(enum.Enum):
    """What a job copies, ``source->destination``."""

    LOAD = "host->gpu"
    STORE = "gpu->host"
    DISK_READ = "disk->host"
    """A promotion: brings a disk block back to a host slot (prefetch)."""
    DISK_WRITE = "host->disk"
    """A demotion: copies a READABLE host block to a disk slot."""
    REMOTE_LOOKUP = "remote?"
    """Asks the remote tier which of a request's blocks it holds (no bytes move)."""
    REMOTE_READ = "remote->host"
    """Brings one block from the remote tier into a host slot."""
    REMOTE_WRITE = "host->remote"
    """Copies one READABLE host block to the remote tier."""

    @property
    def uses_gpu_blocks(self) -> bool:
        """Whether the job reads or writes GPU blocks (and so may need a fence)."""
        return self in (JobKind.LOAD, JobKind.STORE)


class JobState(enum.Enum):
    PLANNED = "planned"
    """Created this step; the workers have not received it."""
    IN_FLIGHT = "in_flight"
    """Sent to the workers; not every worker has reported it."""
    DONE = "done"
    """Every worker reported it, none failed (the job has left the table)."""
    FAILED = "failed"
    """Every worker reported it, at least one failed (the job has left the table)."""


@dataclass
class Job:
    """One copy job, as the scheduler side tracks it."""

    job_id: JobId
    kind: JobKind
    keys: list[BlockKey]
    """The blocks copied, in the order of ``gpu_block_ids`` (loads and stores) or the one
    block of a disk job."""
    gpu_block_ids: list[int]
    """GPU blocks the copy reads or writes (empty for disk jobs)."""
    remaining: int
    """Workers that have not reported the job yet."""
    req_id: str | None = None
    """The request the job serves (loads and promotions), or None."""
    state: JobState = JobState.PLANNED
    failed: bool = False
    """A worker reported the job failed (final once ``remaining`` is 0)."""


@dataclass
class JobTable:
    """Unfinished jobs by id, the GPU blocks they use, and the fences re-allocation needs.

    ``num_workers``: how many workers must report each job before it is finished.
    """

    num_workers: int
    _jobs: dict[JobId, Job] = field(default_factory=dict)
    _next_id: JobId = 0
    _planned: list[JobId] = field(default_factory=list)
    _by_gpu_block: dict[int, set[JobId]] = field(default_factory=dict)
    """GPU block id -> unfinished jobs that use it."""
    _reallocated: set[int] = field(default_factory=set)
    _counts: Counter[JobKind] = field(default_factory=Counter)
    """Unfinished jobs per kind (kept, not counted by scanning the table)."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"tokenvm: a job table needs num_workers >= 1, got {self.num_workers}")

    # -- planning -----------------------------------------------------------------------------

    def add(
        self, kind: JobKind, keys: Sequence[BlockKey], gpu_block_ids: Sequence[int] = (),
        req_id: str | None = None,
    ) -> JobId:
        """A new PLANNED job; returns its id."""
        if gpu_block_ids and not kind.uses_gpu_blocks:
            raise ValueError(f"tokenvm: a {kind.value} job has no GPU blocks, got {gpu_block_ids}")
        job_id = self._next_id
        self._next_id += 1
        self._jobs[job_id] = Job(job_id, kind, list(keys), list(gpu_block_ids),
                                 self.num_workers, req_id)
        self._planned.append(job_id)
        self._counts[kind] += 1
        by_block = self._by_gpu_block
        for block_id in gpu_block_ids:  # (a load or store job has hundreds: no set made twice)
            users = by_block.get(block_id)
            if users is None:
                by_block[block_id] = {job_id}
            else:
                users.add(job_id)
        return job_id

    def reallocated(self, gpu_block_ids: Iterable[int]) -> None:
        """vLLM handed these GPU blocks to a request this step (taken from its free queue)."""
        self._reallocated.update(gpu_block_ids)

    def send(self) -> set[JobId]:
        """End of the step's planning: returns the IN_FLIGHT jobs that use a GPU block
        re-allocated this step (the worker must fence them before the forward), then marks
        every PLANNED job IN_FLIGHT and forgets the step's re-allocations."""
        # (every step: only the re-allocated blocks some job uses, found by a set intersection)
        fences = {
            job_id
            for block_id in self._reallocated & self._by_gpu_block.keys()
            for job_id in self._by_gpu_block[block_id]
            if self._jobs[job_id].state is JobState.IN_FLIGHT
        }
        for job_id in self._planned:
            job = self._jobs.get(job_id)
            if job is not None:
                job.state = JobState.IN_FLIGHT
        self._planned.clear()
        self._reallocated.clear()
        return fences

    # -- completion ------------------------------------------------------------------------

    def copied(self, job_id: JobId) -> None:
        """Every worker's copy of ``job_id`` is known to have ended, before their reports
        (one worker, in the scheduler's process: ``load_early_finish``): its GPU blocks need no
        fence from now on; the job stays in the table until ``report``."""
        job = self._jobs.get(job_id)
        if job is not None:
            self._release_blocks(job)

    def report(self, job_id: JobId, finished: int, failed: int = 0) -> Job | None:
        """``finished`` more workers finished ``job_id``, ``failed`` of them unsuccessfully.

        Returns the job once every worker has reported it: removed from the table, its GPU
        blocks no longer in flight, state DONE or FAILED. Returns None while workers remain, and
        for an id the table does not hold (already finished: a report is never applied twice).
        """
        job = self._jobs.get(job_id)
        if job is None:
            return None
        job.remaining -= finished
        job.failed |= failed > 0
        if job.remaining > 0:
            return None
        del self._jobs[job_id]
        self._counts[job.kind] -= 1
        self._release_blocks(job)
        job.state = JobState.FAILED if job.failed else JobState.DONE
        return job

    def _release_blocks(self, job: Job) -> None:
        """``job`` no longer uses its GPU blocks: nothing fences it from now on."""
        for block_id in job.gpu_block_ids:
            users = self._by_gpu_block.get(block_id)
            if users is not None:
                users.discard(job.job_id)
                if not users:
                    del self._by_gpu_block[block_id]

    # -- queries ---------------------------------------------------------------------------

    def in_flight(self, kind: JobKind) -> int:
        """Unfinished jobs of ``kind`` (PLANNED or IN_FLIGHT)."""
        return self._counts[kind]

    def jobs_on(self, gpu_block_id: int) -> set[JobId]:
        """Unfinished jobs that use ``gpu_block_id``."""
        return set(self._by_gpu_block.get(gpu_block_id, ()))

    def get(self, job_id: JobId) -> Job | None:
        return self._jobs.get(job_id)

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs
