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
   prefix-cache hit and answers ``(tokens, True)``: vLLM allocates GPU blocks and parks the
   request (WAITING_FOR_REMOTE_KVS).
3. Loaded: ``update_state_after_alloc`` pins the slots (readers += 1) and queues a load job; the
   worker copies and reports the request in ``finished_recving``; the completion unpins.
4. Evicted: when a slot is needed and the tier is full, the policy's best unpinned victim goes.

Safety: a copy may still use a GPU block after vLLM freed it (a request finished or was preempted
while its store or load was in flight). Every in-flight job's GPU blocks are tracked; when vLLM
hands one of them to a request again, the job is put in ``fence_job_ids`` and the worker makes
the step's KV writes wait for it (``handle_preemptions``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenvm_vllm import compat
from tokenvm_vllm.config import TokenVMConfig
from tokenvm_vllm.connector.metadata import (
    CopyJob,
    TokenVMConnectorMetadata,
    TokenVMWorkerMetadata,
)
from tokenvm_vllm.connector.stats import TokenVMStats
from tokenvm_vllm.keys import BlockKey, make_block_key
from tokenvm_vllm.policies import make_policy
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


@dataclass
class PendingJob:
    """A copy job the workers have not all finished yet."""

    is_load: bool
    keys: list[BlockKey]
    gpu_block_ids: list[int]
    remaining: int
    req_id: str | None = None
    failed: bool = False


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
        logger.info(
            "TokenVM scheduler: %d host slots of %d bytes, block size %d, policy %s",
            self.host.num_slots, slot_bytes, self.block_size, config.policy)

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
        self.requests.setdefault(request.request_id, RequestState(request))

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        state = self.requests.setdefault(request.request_id, RequestState(request))
        state.hit_blocks = 0
        if state.load_job_id is not None:
            return None, False  # a load for this request is still in flight
        start = state.local_blocks = num_computed_tokens // self.block_size
        # Leave at least one prompt token to compute: vLLM needs a forward to sample from.
        stop = min(self.num_hashed_blocks(request), (request.num_tokens - 1) // self.block_size)
        if stop <= start:
            return 0, False
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
        return hits * self.block_size, True

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
        job = self._new_job(True, keys, gpu_block_ids, req_id=request.request_id)
        self._step_loads.append(CopyJob(job, gpu_block_ids, slots, req_id=request.request_id))
        state.load_job_id = job
        state.next_store_block = max(state.next_store_block, start + num_blocks)
        self.stats.add("loaded_blocks", num_blocks)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> TokenVMConnectorMetadata:
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
        meta = TokenVMConnectorMetadata(
            loads=self._step_loads, store=self._plan_store(scheduler_output),
            fence_job_ids=fence_job_ids)
        self._step_loads = []
        self._step_allocated = set()
        self._step_first_job_id = self._next_job_id
        return meta

    def _plan_store(self, scheduler_output: SchedulerOutput) -> CopyJob | None:
        """Reserve host slots for every block this step's forward fills that the host lacks."""
        gpu_block_ids: list[int] = []
        slots: list[int] = []
        keys: list[BlockKey] = []
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
                evictions = self.host.evictions
                slot = self.host.begin_write(key)
                if slot is None:
                    self.stats.add("store_skipped_blocks", 1)
                    continue
                self.stats.add("host_evicted_blocks", self.host.evictions - evictions)
                keys.append(key)
                gpu_block_ids.append(state.block_ids[i])
                slots.append(slot)
            state.next_store_block = filled
        if not keys:
            return None
        job = self._new_job(False, keys, gpu_block_ids)
        self.stats.add("stored_blocks", len(keys))
        return CopyJob(job, gpu_block_ids, slots)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, TokenVMWorkerMetadata):
            return
        for name in ("load_bytes", "store_bytes", "load_seconds", "store_seconds"):
            self.stats.add(name, getattr(meta, name))
        for job_id, count in meta.completed.items():
            job = self.jobs.get(job_id)
            if job is None:
                continue
            job.remaining -= count
            job.failed |= meta.failed.get(job_id, 0) > 0
            if job.remaining > 0:
                continue
            self._finish_job(job_id, job)

    def _finish_job(self, job_id: int, job: PendingJob) -> None:
        del self.jobs[job_id]
        for block_id in job.gpu_block_ids:
            waiting = self._gpu_block_jobs.get(block_id)
            if waiting is not None:
                waiting.discard(job_id)
                if not waiting:
                    del self._gpu_block_jobs[block_id]
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

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Never delays the free: in-flight copies of freed blocks are fenced on re-use."""
        self.requests.pop(request.request_id, None)
        return False, None

    def has_pending_work(self) -> bool:
        """Keep the engine stepping while copies are in flight, so their completions arrive."""
        return bool(self.jobs)

    def get_stats(self) -> TokenVMStats | None:
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, TokenVMStats()
        return stats

    def reset_cache(self) -> bool:
        """Drop every unpinned host block (vLLM's ``reset_prefix_cache``)."""
        self.host.clear()
        return True

    def _new_job(
        self, is_load: bool, keys: list[BlockKey], gpu_block_ids: list[int],
        req_id: str | None = None,
    ) -> int:
        job_id = self._next_job_id
        self._next_job_id += 1
        self.jobs[job_id] = PendingJob(is_load, keys, gpu_block_ids, self.num_workers, req_id)
        for block_id in gpu_block_ids:
            self._gpu_block_jobs.setdefault(block_id, set()).add(job_id)
        return job_id

    def describe(self) -> dict[str, Any]:
        return {"host_slots": self.host.num_slots, "host_used": self.host.num_used,
                "jobs_in_flight": len(self.jobs)}
