"""The scheduler side of the connector (vLLM's engine-core process).

It owns the residency index and the host tier's slot bookkeeping, answers vLLM's "how much of
this prompt can you load?" question, plans each step's copies and tells the workers through
``TokenVMConnectorMetadata``. It never touches tensors.

Life of a block:
1. Stored (write-through): when a step's forward fills a block whose hash is known and that the
   host tier lacks, ``build_connector_meta`` reserves a host slot (WRITING) and puts the pair
   (GPU block, slot) into that step's store job. The worker copies it after the forward; its
   completion, reported in the worker metadata, makes the slot READABLE.
2. Found: ``get_num_new_matched_tokens`` counts the READABLE blocks that follow vLLM's own
   prefix-cache hit. With ``load_mode="async"`` it answers ``(tokens, True)``: vLLM allocates GPU
   blocks and parks the request (WAITING_FOR_REMOTE_KVS). With ``"layerwise"`` it answers
   ``(tokens, False)``: vLLM allocates and schedules the request's remaining tokens in the same
   step.
3. Loaded: ``update_state_after_alloc`` pins the slots (readers += 1) and queues a load job.
   Async: the worker copies and reports the request in ``finished_recving``. Layer-wise: the
   worker copies layer by layer while the forward runs, each attention layer waiting on the GPU
   for its own layer. Either way the completion, reported in the worker metadata, unpins.
4. Evicted: when a slot is needed and the tier is full, the policy's best unpinned victim goes.

Write-back (``write_mode="write_back"``): instead of step 1, each step copies the cached blocks
nearest the eviction end of vLLM's GPU free queue (``bind_gpu_block_pool``) that host memory
lacks, up to a look-ahead; blocks still in use or recently freed are not copied until they get
close to eviction, so blocks that are reused from the GPU cache never cross PCIe.

Disk tier (``disk_path``): every block that becomes READABLE in host is also copied to disk in
the background (its host slot pinned meanwhile), so a host eviction never loses it. When a
request arrives (``on_new_request``) the disk-resident part of its prefix that host memory lacks
is promoted disk -> host at once (prefetch), overlapping the time the request waits in vLLM's
queue; ``get_num_new_matched_tokens`` answers "ask again" (None) while that promotion is in
flight, until ``disk_prefetch_timeout_s``, after which only what is ready counts. After a restart
the workers scan their stores; the scheduler adopts the blocks every worker found.

Safety: a copy may still use a GPU block after vLLM freed it (a request finished or was preempted
while its store or load was in flight). Every in-flight job's GPU blocks are tracked; when vLLM
hands one of them to a request again, the job is put in ``fence_job_ids`` and the worker makes
the step's KV writes wait for it (``handle_preemptions``).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenvm_vllm import compat
from tokenvm_vllm.config import TokenVMConfig
from tokenvm_vllm.connector.metadata import (
    CopyJob,
    DiskJob,
    TokenVMConnectorMetadata,
    TokenVMWorkerMetadata,
)
from tokenvm_vllm.connector.stats import TokenVMStats
from tokenvm_vllm.keys import BlockKey, make_block_key
from tokenvm_vllm.policies import make_policy
from tokenvm_vllm.tiers.disk import disk_slot_count
from tokenvm_vllm.tiers.disk_tier import DiskTier
from tokenvm_vllm.tiers.host_tier import HostTier
from tokenvm_vllm.tiers.residency import ResidencyIndex
from tokenvm_vllm.transfer.host_pool import num_host_slots
from tokenvm_vllm.transfer.layout import block_size_for, slot_bytes_for

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.tokenvm")


@dataclass
class RequestState:
    """What the scheduler side remembers about one live request."""

    request: Request
    block_ids: list[int] = field(default_factory=list)
    """The request's GPU block ids (group 0), as vLLM allocated them."""
    next_store_block: int = 0
    """Blocks below this index are stored, loaded or local hits: never stored again."""
    local_blocks: int = 0
    """vLLM's own prefix-cache hit (blocks) at the last lookup."""
    hit_blocks: int = 0
    """The host hit the last lookup promised, in blocks after ``local_blocks``."""
    load_job_id: int | None = None
    protected: list[BlockKey] = field(default_factory=list)
    """Prompt block keys the eviction policy protects while the request lives."""
    promotions: set[int] = field(default_factory=set)
    """Disk -> host jobs in flight for this request's prefix."""
    prefetched_blocks: int = 0
    """Promotions issued for this request, not yet judged on time or late."""
    lookup_deferred: bool = False
    prefetch_deadline: float = 0.0


class JobKind(enum.Enum):
    LOAD = "host->gpu"
    STORE = "gpu->host"
    DISK_READ = "disk->host"
    DISK_WRITE = "host->disk"


@dataclass
class PendingJob:
    """A copy job the workers have not all finished yet."""

    kind: JobKind
    keys: list[BlockKey]
    gpu_block_ids: list[int]
    remaining: int
    req_id: str | None = None
    failed: bool = False

    @property
    def is_load(self) -> bool:
        return self.kind is JobKind.LOAD


class TokenVMScheduler:
    def __init__(
        self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, config: TokenVMConfig
    ) -> None:
        self.config = config
        self.block_size = block_size_for(kv_cache_config)
        tokens_per_hash = compat.tokens_per_hash(kv_cache_config, vllm_config)
        if self.block_size % tokens_per_hash:
            raise ValueError(
                f"tokenvm: block size {self.block_size} is not a multiple of the hash block "
                f"size {tokens_per_hash}")
        self.hashes_per_block = self.block_size // tokens_per_hash
        self.num_workers = vllm_config.parallel_config.world_size
        slot_bytes = slot_bytes_for(kv_cache_config)
        self.index = ResidencyIndex()
        self.host = HostTier(
            num_host_slots(config.host_bytes, slot_bytes), self.index, make_policy(config.policy))
        self.requests: dict[str, RequestState] = {}
        self.jobs: dict[int, PendingJob] = {}
        self._gpu_block_jobs: dict[int, set[int]] = {}
        self._next_job_id = 0
        self._step_first_job_id = 0
        self._step_loads: list[CopyJob] = []
        self._step_allocated: set[int] = set()
        self.stats = TokenVMStats()
        self.gpu_block_pool: Any = None
        # At most half the host tier: a window larger than what host memory keeps would copy
        # blocks that evict each other, step after step, for ever.
        self.write_back_lookahead = max(1, min(
            config.write_back_lookahead_blocks
            or 2 * vllm_config.scheduler_config.max_num_batched_tokens // self.block_size,
            self.host.num_slots // 2))
        self.disk: DiskTier | None = None
        self.disk_ready = False
        """False until every worker reported its start-up scan: no disk slot is handed out
        before the recovered ones are known."""
        self._disk_scans = 0
        self._disk_recovered: Counter = Counter()
        self._disk_write_queue: deque[BlockKey] = deque()
        self._step_disk_reads: list[DiskJob] = []
        if config.disk_path:
            self.disk = DiskTier(disk_slot_count(config.disk_bytes, slot_bytes), self.index,
                                 make_policy(config.policy))
        logger.info(
            "TokenVM scheduler: %d host slots of %d bytes, %s, block size %d, policy %s",
            self.host.num_slots, slot_bytes,
            f"{self.disk.num_slots} disk slots" if self.disk else "no disk tier",
            self.block_size, config.policy)

    # -- keys --------------------------------------------------------------------------------

    def block_keys(self, request: Request, start: int, stop: int) -> list[BlockKey]:
        """Keys of the request's blocks ``start..stop-1`` (each must be hashed already)."""
        hashes = request.block_hashes
        per = self.hashes_per_block
        return [make_block_key(hashes[(i + 1) * per - 1]) for i in range(start, stop)]

    def num_hashed_blocks(self, request: Request) -> int:
        return len(request.block_hashes) // self.hashes_per_block

    # -- vLLM scheduler hooks ---------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        state = self.requests.setdefault(request.request_id, RequestState(request))
        state.prefetch_deadline = time.monotonic() + self.config.disk_prefetch_timeout_s
        # Queued and running requests will need their prefix: the queue-aware policy evicts
        # those blocks last (other policies ignore protect/unprotect).
        state.protected = self.block_keys(request, 0, self._lookup_stop(request))
        self.host.policy.protect(state.protected)
        if self.disk is not None:
            self.disk.policy.protect(state.protected)
        self._prefetch(state)

    def _lookup_stop(self, request: Request) -> int:
        """Blocks a lookup may cover: hashed, and leaving one prompt token to compute (vLLM
        needs a forward to sample from)."""
        return min(self.num_hashed_blocks(request), (request.num_tokens - 1) // self.block_size)

    def _prefetch(self, state: RequestState, start: int = 0) -> None:
        """Start disk -> host promotions for the prefix blocks host memory lacks."""
        if self.disk is None or not self.disk_ready:
            return
        request = state.request
        issued = 0
        for key in self.block_keys(request, start, self._lookup_stop(request)):
            if self.host.contains(key):
                continue  # readable, or being written (by a store or another promotion)
            if not self.index.is_readable(key, self.disk.tier):
                break  # a miss: later blocks could not be used anyway
            host_slot = self.host.begin_write(key)
            if host_slot is None:
                break  # every host slot pinned
            (disk_slot,) = self.disk.begin_read([key])
            job = self._new_job(JobKind.DISK_READ, [key], [], req_id=request.request_id)
            self._step_disk_reads.append(DiskJob(job, key, host_slot, disk_slot))
            state.promotions.add(job)
            issued += 1
        state.prefetched_blocks += issued
        if issued:
            state.prefetch_deadline = time.monotonic() + self.config.disk_prefetch_timeout_s

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        state = self.requests.setdefault(request.request_id, RequestState(request))
        state.hit_blocks = 0
        if state.load_job_id is not None:
            return None, False  # a load for this request is still in flight
        start = state.local_blocks = num_computed_tokens // self.block_size
        stop = self._lookup_stop(request)
        if stop <= start:
            return 0, False
        if not state.promotions:
            self._prefetch(state, start)  # blocks may have reached disk since arrival
        waiting_for_disk = state.promotions or (self.disk is not None and not self.disk_ready)
        if waiting_for_disk and time.monotonic() < state.prefetch_deadline:
            self.stats.add("lookup_deferred", 1)
            state.lookup_deferred = True
            return None, False  # disk -> host in flight, or the start-up scan: ask again
        if state.prefetched_blocks:
            late = state.lookup_deferred
            self.stats.add("prefetch_late_blocks" if late else "prefetch_on_time_blocks",
                           state.prefetched_blocks)
            state.prefetched_blocks, state.lookup_deferred = 0, False
        keys = self.block_keys(request, start, stop)
        hits = self.host.readable_prefix(keys)
        self.stats.add("lookup_blocks", len(keys))
        self.stats.add("host_hit_blocks", hits)
        if hits < self.config.min_load_blocks:
            return 0, False
        state.hit_blocks = hits
        if self.config.trace:
            logger.info("TokenVM trace %.6f lookup req=%s hit_blocks=%d", time.monotonic(),
                        request.request_id, hits)
        return hits * self.block_size, self.config.load_mode == "async"

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        state = self.requests.setdefault(request.request_id, RequestState(request))
        group_blocks = blocks.blocks[0]
        state.block_ids = [block.block_id for block in group_blocks]
        start = state.local_blocks
        # Blocks past vLLM's own prefix hit were just taken from the free queue: an in-flight
        # copy may still use them. (Local hits were in use or cached, so no copy targets them.)
        self._step_allocated.update(state.block_ids[start:])
        state.next_store_block = max(state.next_store_block, start)
        if num_external_tokens == 0:
            return
        # A partial last block is loaded whole: its extra tokens are recomputed over it.
        num_blocks = -(-num_external_tokens // self.block_size)
        assert num_blocks <= state.hit_blocks, "vLLM asked for more than TokenVM offered"
        keys = self.block_keys(request, start, start + num_blocks)
        gpu_block_ids = state.block_ids[start:start + num_blocks]
        slots = self.host.begin_read(keys)
        job = self._new_job(JobKind.LOAD, keys, gpu_block_ids, req_id=request.request_id)
        layerwise = self.config.load_mode == "layerwise"
        self._step_loads.append(CopyJob(job, gpu_block_ids, slots, req_id=request.request_id,
                                        layerwise=layerwise))
        if not layerwise:
            state.load_job_id = job  # parked until the job finishes; a layer-wise one runs now
        state.next_store_block = max(state.next_store_block, start + num_blocks)
        self.stats.add("loaded_blocks", num_blocks)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> TokenVMConnectorMetadata:
        if self.config.trace and scheduler_output.total_num_scheduled_tokens:
            logger.info("TokenVM trace %.6f step-scheduled tokens=%d", time.monotonic(),
                        scheduler_output.total_num_scheduled_tokens)
        for req_id, new_block_ids, resumed in compat.yield_req_data(scheduler_output):
            state = self.requests.get(req_id)
            if state is None or new_block_ids is None:
                continue
            if resumed:
                state.block_ids = list(new_block_ids[0])
            elif req_id in scheduler_output.scheduled_cached_reqs.req_ids:
                state.block_ids.extend(new_block_ids[0])
                self._step_allocated.update(new_block_ids[0])
        for req_id in scheduler_output.preempted_req_ids or ():
            state = self.requests.get(req_id)
            if state is not None:
                state.block_ids = []
        # Only jobs of earlier steps can still use a block vLLM just re-allocated; this step's
        # own loads target those blocks on purpose.
        fence_job_ids = {
            job_id
            for block_id in self._step_allocated
            for job_id in self._gpu_block_jobs.get(block_id, ())
            if job_id < self._step_first_job_id
        }
        self.stats.add("fenced_jobs", len(fence_job_ids))
        meta = TokenVMConnectorMetadata(
            loads=self._step_loads, store=self._plan_store(scheduler_output),
            fence_job_ids=fence_job_ids, disk_reads=self._step_disk_reads,
            disk_writes=self._plan_disk_writes(),
            disk_invalidations=self.disk.take_freed_slots() if self.disk_ready else [])
        self._step_loads = []
        self._step_disk_reads = []
        self._step_allocated = set()
        self._step_first_job_id = self._next_job_id
        return meta

    def bind_gpu_block_pool(self, block_pool: Any) -> None:
        self.gpu_block_pool = block_pool

    def _plan_store(self, scheduler_output: SchedulerOutput) -> CopyJob | None:
        """Reserve host slots for the blocks to copy out this step, as one job."""
        gpu_block_ids: list[int] = []
        slots: list[int] = []
        keys: list[BlockKey] = []
        if self.config.write_mode == "write_back":
            self._plan_write_back(gpu_block_ids, slots, keys)
        else:
            self._plan_write_through(scheduler_output, gpu_block_ids, slots, keys)
        if not keys:
            return None
        job = self._new_job(JobKind.STORE, keys, gpu_block_ids)
        self.stats.add("stored_blocks", len(keys))
        return CopyJob(job, gpu_block_ids, slots)

    def _reserve_host_slot(self, key: BlockKey) -> int | None:
        evictions = self.host.evictions
        slot = self.host.begin_write(key)
        if slot is None:
            self.stats.add("store_skipped_blocks", 1)
        self.stats.add("host_evicted_blocks", self.host.evictions - evictions)
        return slot

    def _plan_write_back(
        self, gpu_block_ids: list[int], slots: list[int], keys: list[BlockKey]
    ) -> None:
        """Cached GPU blocks about to be evicted that host memory lacks. A free block may be
        handed out again while its copy runs: the fence on re-allocation covers that."""
        if self.gpu_block_pool is None:
            return
        for block in compat.iter_free_blocks(self.gpu_block_pool, self.write_back_lookahead):
            key = block.block_hash  # vLLM's hash + 4-byte group id: the BlockKey format
            if key is None or block.is_null:
                continue
            if key in self.index:
                continue  # in host, or on disk (promoted back on demand)
            slot = self._reserve_host_slot(key)
            if slot is None:
                return
            keys.append(key)
            gpu_block_ids.append(block.block_id)
            slots.append(slot)

    def _plan_write_through(
        self, scheduler_output: SchedulerOutput, gpu_block_ids: list[int], slots: list[int],
        keys: list[BlockKey],
    ) -> None:
        """Every block this step's forward fills that the host lacks."""
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            state = self.requests.get(req_id)
            if state is None:
                continue
            request = state.request
            filled = min(
                (request.num_computed_tokens + num_scheduled) // self.block_size,
                self.num_hashed_blocks(request),
                len(state.block_ids),
            )
            if filled <= state.next_store_block:
                continue
            for i, key in enumerate(
                self.block_keys(request, state.next_store_block, filled), state.next_store_block
            ):
                if self.host.contains(key):
                    self.host.touch(key)
                    continue
                if key in keys:
                    continue  # two requests fill the same block in one step; store it once
                slot = self._reserve_host_slot(key)
                if slot is None:
                    continue
                keys.append(key)
                gpu_block_ids.append(state.block_ids[i])
                slots.append(slot)
            state.next_store_block = filled

    def _plan_disk_writes(self) -> list[DiskJob]:
        """Copy newly READABLE host blocks to disk, within the in-flight limit."""
        if self.disk is None or not self.disk_ready:
            self._disk_write_queue.clear()
            return []
        in_flight = sum(1 for job in self.jobs.values() if job.kind is JobKind.DISK_WRITE)
        writes: list[DiskJob] = []
        while self._disk_write_queue:
            key = self._disk_write_queue.popleft()
            if self.disk.contains(key) or not self.index.is_readable(key, self.host.tier):
                continue
            if in_flight + len(writes) >= self.config.disk_max_pending_writes:
                self.stats.add("disk_write_skipped_blocks", 1 + len(self._disk_write_queue))
                self._disk_write_queue.clear()
                break
            disk_slot = self.disk.begin_write(key)
            if disk_slot is None:
                self.stats.add("disk_write_skipped_blocks", 1)
                continue
            (host_slot,) = self.host.begin_read([key])
            job = self._new_job(JobKind.DISK_WRITE, [key], [])
            writes.append(DiskJob(job, key, host_slot, disk_slot))
        return writes

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, TokenVMWorkerMetadata):
            return
        for name in ("load_bytes", "store_bytes", "load_seconds", "store_seconds",
                     "layerwise_loaded_blocks"):
            self.stats.add(name, getattr(meta, name))
        for name in ("load_job_seconds", "store_job_seconds", "disk_io_seconds"):
            self.stats.observe(name, getattr(meta, name))
        if meta.disk_scanned:
            self._adopt_disk_blocks(meta)
        for job_id, count in meta.completed.items():
            job = self.jobs.get(job_id)
            if job is None:
                continue
            job.remaining -= count
            job.failed |= meta.failed.get(job_id, 0) > 0
            if job.remaining > 0:
                continue
            self._finish_job(job_id, job)

    def _adopt_disk_blocks(self, meta: TokenVMWorkerMetadata) -> None:
        """Take over what every worker's start-up scan found (the same key in the same slot)."""
        assert self.disk is not None
        self._disk_scans += meta.disk_scanned
        self._disk_recovered.update(meta.disk_recovered)
        if self._disk_scans < self.num_workers or self.disk_ready:
            return
        found = {key: slot for (key, slot), count in self._disk_recovered.items()
                 if count == self.num_workers}
        adopted = self.disk.adopt(found)
        self.disk_ready = True
        self._disk_recovered.clear()
        self.stats.add("disk_recovered_blocks", adopted)
        logger.info("TokenVM disk tier ready: %d blocks recovered from %s", adopted,
                    self.config.disk_path)

    def _finish_job(self, job_id: int, job: PendingJob) -> None:
        del self.jobs[job_id]
        for block_id in job.gpu_block_ids:
            waiting = self._gpu_block_jobs.get(block_id)
            if waiting is not None:
                waiting.discard(job_id)
                if not waiting:
                    del self._gpu_block_jobs[block_id]
        if job.kind is JobKind.DISK_READ:
            assert self.disk is not None
            (key,) = job.keys
            self.disk.end_read(job.keys, drop=job.failed)
            self.host.end_write(key, ok=not job.failed)
            self.stats.add("disk_read_failed_blocks" if job.failed else "disk_promoted_blocks", 1)
            state = self.requests.get(job.req_id) if job.req_id else None
            if state is not None:
                state.promotions.discard(job_id)
            return
        if job.kind is JobKind.DISK_WRITE:
            assert self.disk is not None
            (key,) = job.keys
            self.host.end_read(job.keys)
            self.disk.end_write(key, ok=not job.failed)
            self.stats.add("disk_write_failed_blocks" if job.failed else "disk_written_blocks", 1)
            return
        if job.is_load:
            # A failed load may mean bad bytes in the slot: drop it rather than serve it again.
            self.host.end_read(job.keys, drop=job.failed)
            if job.failed:
                self.stats.add("failed_load_blocks", len(job.keys))
            if self.config.trace:
                logger.info("TokenVM trace %.6f load-finished job=%d req=%s blocks=%d",
                            time.monotonic(), job_id, job.req_id, len(job.keys))
            state = self.requests.get(job.req_id) if job.req_id else None
            if state is not None and state.load_job_id == job_id:
                state.load_job_id = None
        else:
            for key in job.keys:
                self.host.end_write(key, ok=not job.failed)
            if self.disk is not None and not job.failed:
                self._disk_write_queue.extend(job.keys)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Never delays the free: in-flight copies of freed blocks are fenced on re-use."""
        state = self.requests.pop(request.request_id, None)
        if state is not None and state.protected:
            self.host.policy.unprotect(state.protected)
            if self.disk is not None:
                self.disk.policy.unprotect(state.protected)
        return False, None

    def has_pending_work(self) -> bool:
        """Keep the engine stepping while copies are in flight, so their completions arrive."""
        return bool(self.jobs) or bool(self._disk_write_queue)

    def get_stats(self) -> TokenVMStats | None:
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, TokenVMStats()
        return stats

    def reset_cache(self) -> bool:
        """Drop every unpinned host and disk block (vLLM's ``reset_prefix_cache``)."""
        self.host.clear()
        if self.disk is not None:
            self.disk.clear()
        return True

    def _new_job(
        self, kind: JobKind, keys: list[BlockKey], gpu_block_ids: list[int],
        req_id: str | None = None,
    ) -> int:
        job_id = self._next_job_id
        self._next_job_id += 1
        self.jobs[job_id] = PendingJob(kind, keys, gpu_block_ids, self.num_workers, req_id)
        for block_id in gpu_block_ids:
            self._gpu_block_jobs.setdefault(block_id, set()).add(job_id)
        return job_id
