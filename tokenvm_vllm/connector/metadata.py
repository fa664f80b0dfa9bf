"""What crosses the process boundary once per engine step, in both directions.

Scheduler -> workers: ``TokenVMConnectorMetadata`` (the step's loads, store, disk reads and
writes, disk slots to invalidate, remote lookups, reads and writes, and the jobs to fence).
Workers -> scheduler: ``TokenVMWorkerMetadata`` (finished and failed jobs, byte counts and
times, the start-up disk scan, remote lookup answers), summed over tensor-parallel ranks by
vLLM's output aggregator. Both are plain dataclasses of ints, bytes and lists so they
pickle/serialize small. Job ids come from the scheduler's
``JobTable`` (``jobs.py``), which also defines what each kind of job copies.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from tokenvm_vllm.connector.jobs import JobId
from tokenvm_vllm.keys import BlockKey


@dataclass
class CopyJob:
    """Copy ``gpu_block_ids[i]`` <-> ``host_slots[i]`` for every i, as one batch."""

    job_id: JobId
    gpu_block_ids: list[int]
    host_slots: list[int]
    req_id: str | None = None
    """For loads: the request the blocks are for. None for stores."""
    layerwise: bool = False
    """For loads: False, the request is parked until this job finishes (``finished_recving``),
    unless ``sync``; True, the request runs in this same step and each attention layer waits
    for its own layer's copy (``wait_for_layer_load``)."""
    sync: bool = False
    """For loads: the request runs in this same step and the step's forward waits (on the GPU)
    for the whole copy, queued before it (``load_mode="sync"``)."""
    groups: list[int] | None = None
    """Hybrid models: the KV cache group of each block (the layers ``gpu_block_ids[i]`` is
    copied for). None: every block is in group 0 (models with one KV cache group)."""


@dataclass
class DiskJob:
    """Copy one block between host slot ``host_slot`` and disk slot ``disk_slot``."""

    job_id: JobId
    key: BlockKey
    """The block's key, written into (and checked against) the disk slot's header."""
    host_slot: int
    disk_slot: int


@dataclass
class RemoteLookup:
    """Ask the remote tier for ``keys`` (a request's blocks that host and disk lack, in prefix
    order); the worker reports how many, from the first, it holds (``remote_found``)."""

    job_id: JobId
    keys: list[BlockKey]


@dataclass
class RemoteBatch:
    """One pipelined batch between host slots and the remote tier: block ``keys[i]`` in host
    slot ``host_slots[i]`` is job ``job_ids[i]`` (each block finishes or fails on its own)."""

    job_ids: list[JobId]
    keys: list[BlockKey]
    host_slots: list[int]


@dataclass
class TokenVMConnectorMetadata(KVConnectorMetadata):
    loads: list[CopyJob] = field(default_factory=list)
    """Host -> GPU, one job per request; the worker starts them in the step's first call
    (``handle_preemptions``, else ``start_load_kv``), before the forward."""
    store: CopyJob | None = None
    """GPU -> host, one job: ``write_back``, cached blocks near the eviction end of vLLM's free
    queue; ``write_through``, blocks this step's forward fills. Started after the forward is
    queued (``get_finished``)."""
    fence_job_ids: set[JobId] = field(default_factory=set)
    """Jobs of earlier steps still using GPU blocks that this step re-allocates: the forward
    must wait for them (``JobTable.send``)."""
    disk_reads: list[DiskJob] = field(default_factory=list)
    """Disk -> host promotions (prefetch); the host slots are WRITING until they finish."""
    disk_writes: list[DiskJob] = field(default_factory=list)
    """Host -> disk copies of blocks already READABLE in host; their host slots are pinned."""
    disk_invalidations: list[int] = field(default_factory=list)
    """Disk slots whose block was dropped: zero their headers before any later write."""
    remote_lookups: list[RemoteLookup] = field(default_factory=list)
    """Which of a new request's blocks the remote tier holds."""
    remote_reads: list[RemoteBatch] = field(default_factory=list)
    """Remote -> host; the host slots are WRITING until each block's job finishes."""
    remote_writes: list[RemoteBatch] = field(default_factory=list)
    """Host -> remote copies of READABLE host blocks; their host slots are read-pinned."""
    host_slots: int = 0
    """The scheduler's host slot count (0: not stated). With ``host_bytes: "auto"`` only the
    scheduler measures the machine; the workers pin this many slots (``worker.py``)."""
    elastic_commands: list[tuple[str, int]] = field(default_factory=list)
    """Elastic GPU KV: ``("map" | "unmap", page group)`` in order, applied by every worker
    before this step's loads and forward (``elastic/protocol.py``)."""
    elastic_reserve: int = 0
    """Elastic GPU KV: page groups' memory every worker keeps created and unmapped after this
    step (``protocol.ReserveLedger``)."""
    host_moves: list[tuple[int, int]] = field(default_factory=list)
    """Host memory pressure: ``(from slot, to slot)`` copies inside the host pool (a shrink
    keeps its hottest blocks by moving them below the slots given up), made by every worker
    before ``host_commands`` and before any of this step's copies."""
    host_commands: list[tuple[str, int]] = field(default_factory=list)
    """Host memory pressure (``tiers/host_pressure.py``): ``("release", first_slot)``, no block
    is left in that slot or above, give the memory back; ``("grow", usable_slots)``, slots
    below may be used again from this step on. Applied by every worker before this step's
    copies."""


@dataclass
class TokenVMWorkerMetadata(KVConnectorWorkerMetadata):
    completed: Counter[JobId] = field(default_factory=Counter)
    """job id -> number of workers that finished it."""
    failed: Counter[JobId] = field(default_factory=Counter)
    """job id -> number of workers on which it failed (a subset of ``completed``)."""
    load_bytes: int = 0
    store_bytes: int = 0
    load_seconds: float = 0.0
    store_seconds: float = 0.0
    layerwise_loaded_blocks: int = 0
    """Blocks of layer-wise loads whose every layer was awaited separately (pipelined)."""
    load_job_seconds: list[float] = field(default_factory=list)
    store_job_seconds: list[float] = field(default_factory=list)
    disk_io_seconds: list[float] = field(default_factory=list)
    disk_scanned: int = 0
    """Workers that finished scanning their disk store at start-up (sent once each)."""
    disk_recovered: Counter[tuple[bytes, int]] = field(default_factory=Counter)
    """(key, disk slot) pairs the scan found valid -> number of workers that found them."""
    remote_found: Counter[tuple[JobId, int]] = field(default_factory=Counter)
    """(lookup job, blocks the remote tier holds from the first) -> workers that found that."""
    remote_io_seconds: list[float] = field(default_factory=list)
    """Submit to completion seen, per remote batch (lookup, read or write)."""
    remote_unanswered: Counter[JobId] = field(default_factory=Counter)
    """job id -> workers on which it failed for lack of an answer from the server (a subset of
    ``failed``): a read that timed out, not a block the server lacks."""
    remote_counts: Counter[str] = field(default_factory=Counter)
    """The workers' ``RemoteStore.stats()`` (bytes, timeouts, failures), summed."""
    remote_went_down: int = 0
    """Workers whose remote store became unreachable since their last report (start-up too)."""
    remote_came_back: int = 0
    """Workers whose remote store became reachable again since their last report."""
    elastic_reserve: list[tuple[int, int]] = field(default_factory=list)
    """Elastic GPU KV, one per worker, every step: (metadata applied, page groups reserved)."""
    elastic_apply_seconds: list[float] = field(default_factory=list)
    """Elastic GPU KV: time each metadata's map/unmap commands took on a worker, before the
    step's forward (its critical path)."""

    def aggregate(self, other: KVConnectorWorkerMetadata) -> TokenVMWorkerMetadata:
        """Sum over tensor-parallel ranks: every field (counters, numbers, lists of
        observations) combines with ``+``."""
        assert isinstance(other, TokenVMWorkerMetadata)
        return TokenVMWorkerMetadata(**{
            f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def is_empty(self) -> bool:
        return (not self.completed and not self.disk_scanned and not self.remote_went_down
                and not self.remote_came_back and not self.elastic_reserve)
