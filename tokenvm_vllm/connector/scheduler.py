"""The scheduler side of the connector (vLLM's engine-core process): glue between vLLM's
scheduler hooks, the ``TierManager`` (``tiers/manager.py``: where blocks live, what may move)
and the ``JobTable`` (``connector/jobs.py``: copies in flight, fences). It never touches tensors;
each step's plan goes to the workers as ``TokenVMConnectorMetadata`` (``metadata.py``).

Life of a block, by hook:

* ``on_new_request``: the request's prefix keys are protected from eviction (queue-aware
  policy) and the part of the prefix that is on disk but not in host memory is promoted at
  once (prefetch), overlapping the request's wait in vLLM's queue.
* ``get_num_new_matched_tokens``: counts the host-READABLE blocks after vLLM's own prefix hit.
  ``load_mode="async"`` answers ``(tokens, True)``: vLLM allocates GPU blocks and parks the
  request until the load finishes. ``"layerwise"`` and ``"sync"`` answer ``(tokens, False)``:
  the request runs in the same step while its copy goes layer by layer (layerwise) or whole,
  before the forward, which waits for it on the GPU (sync). While a promotion for the request
  (or the disk tier's start-up scan) is in flight it answers "ask again" (None), until
  ``disk_prefetch_timeout_s``; after that only what is ready counts. A request whose hit
  blocks another request is loading right now is also asked again (None), as vLLM native
  does: once that load lands they are hits in vLLM's own cache, not a second copy into a
  second set of GPU blocks (seen on the H200: ~10% more blocks loaded under load without it).
  With ``load_defer_steps`` a request whose load would evict prefix-cached GPU blocks, while a
  request waiting behind it has its prefix on the GPU, is asked again too (``_defer_load``),
  at most that many times: vLLM runs the GPU hit first.
* ``update_state_after_alloc``: pins the host slots and plans a load job.
* ``build_connector_meta``: plans the step's store (``write_back``: cached blocks nearest the
  eviction end of vLLM's GPU free queue, ``bind_gpu_block_pool``, that host memory lacks;
  ``write_through``: every block this step's forward fills), the demotions to disk of blocks
  that became READABLE in host, the disk slots to invalidate, and the fences.
* ``update_connector_output``: the workers' reports finish jobs; each finished job completes
  its tier movement (``TierManager.complete_*``).

After a restart the workers scan their disk stores; the blocks every worker found are adopted.

With a remote tier (``remote_url``): on arrival the request's blocks that host and disk lack
are looked up in the remote tier (a ``RemoteLookup`` the workers answer with how many, from the
first, Redis holds; the smallest answer over ranks counts), then read into WRITING host slots
(``RemoteBatch`` in ``remote_reads``); meanwhile ``get_num_new_matched_tokens`` answers None, up
to ``disk_prefetch_timeout_s``. Blocks that became READABLE in host go out to the remote tier in
the background (``remote_writes``, at most ``remote_max_pending_writes`` in flight). While a
worker reports its store unreachable, nothing is looked up (no request waits for a dead tier).
With ``remote_reads="auto"`` the blocks found are read only while ``remote_gate``
(``policies/remote_gate.py``) expects that to beat recomputing them; it is fed here: each
step's tokens (``build_connector_meta`` -> ``update_connector_output``) and each step's read
batches (sent -> reported done).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from tokenvm_vllm import compat
from tokenvm_vllm.config import LoadMode, RemoteReads, TokenVMConfig
from tokenvm_vllm.connector.early_finish import EarlyFinish
from tokenvm_vllm.connector.jobs import Job, JobKind, JobState, JobTable
from tokenvm_vllm.connector.metadata import (
    CopyJob,
    DiskJob,
    RemoteBatch,
    RemoteLookup,
    TokenVMConnectorMetadata,
    TokenVMWorkerMetadata,
)
from tokenvm_vllm.connector.requests import RequestState
from tokenvm_vllm.connector.stats import TokenVMStats
from tokenvm_vllm.connector.store_planner import StorePlanner
from tokenvm_vllm.elastic.scheduler_side import SchedulerElastic, blocks_needed
from tokenvm_vllm.keys import BlockKey, make_block_key, with_group
from tokenvm_vllm.policies.remote_gate import RemoteGate
from tokenvm_vllm.tiers.disk import disk_slot_count
from tokenvm_vllm.tiers.host_pressure import HostPressure, file_available
from tokenvm_vllm.tiers.manager import TierManager
from tokenvm_vllm.tiers.residency import Tier
from tokenvm_vllm.transfer.host_pool import host_slots_for, mem_available
from tokenvm_vllm.transfer.layout import (
    block_size_for,
    kv_cache_groups,
    replicated_latent_kv,
    slot_bytes_for,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.tokenvm")

REMOTE_STORE_COUNTERS = ("read_bytes", "written_bytes", "corrupt_blocks", "timeouts",
                         "failed_batches", "dropped_batches", "expired_batches", "outages",
                         "io_process_exits")
"""``RemoteStore.stats()`` names (and ``ProcessSlotIO``'s ``io_process_exits``) passed on to
/metrics as ``tokenvm:remote_<name>``."""


IDLE_TICK_S = 0.02
"""Elastic mode: the pace of the empty steps that wait out an idle period (``has_pending_work``):
at most 50 a second while the engine has nothing else to do; a request arriving meanwhile waits
at most this long for the step in progress."""


class TokenVMScheduler:
    def __init__(
        self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, config: TokenVMConfig
    ) -> None:
        self.config = config
        self._vllm_config = vllm_config
        self.groups = kv_cache_groups(kv_cache_config)
        """vLLM's KV cache groups: one for most models; hybrid models (``SupportsHMA``) have
        e.g. a sliding-window group and a full-attention group, each block stored per group."""
        self._full_groups = [g.index for g in self.groups if g.sliding_window is None]
        self._window_groups = [g for g in self.groups if g.sliding_window is not None]
        self.block_size = block_size_for(kv_cache_config)
        tokens_per_hash = compat.tokens_per_hash(kv_cache_config, vllm_config)
        if self.block_size % tokens_per_hash:
            raise ValueError(
                f"tokenvm: block size {self.block_size} is not a multiple of the hash block "
                f"size {tokens_per_hash}")
        self.hashes_per_block = self.block_size // tokens_per_hash
        self.num_workers = vllm_config.parallel_config.world_size
        self.early_finish = EarlyFinish(vllm_config) if config.load_early_finish else None
        """``load_early_finish``: learn of finished loads from the worker in this process
        (``early_finish.py``), in ``update_connector_output``."""
        self.store_once = config.mla_store_once and replicated_latent_kv(
            vllm_config, kv_cache_config)
        """MLA at TP>1: one host pool per node (in /dev/shm), one disk store and one writer,
        rank 0 (``connector/worker.py``); every rank still reports every job."""
        slot_bytes = slot_bytes_for(kv_cache_config)
        # 'auto' is measured here, once: the workers adopt the count from the metadata.
        host_slots, host_how = host_slots_for(
            config.host_bytes, slot_bytes, 1 if self.store_once else self.num_workers,
            available=self._shared_pool_room() if self.store_once else None)
        if isinstance(config.host_bytes, str):
            logger.info("TokenVM scheduler: %s", host_how)
        self.tiers = TierManager(
            host_slots,
            disk_slot_count(config.disk_bytes, slot_bytes) if config.disk_path else 0,
            config.policy, remote=bool(config.remote_url),
            remote_known_s=min(600.0, config.remote_ttl_s / 2))
        self.pressure: HostPressure | None = None
        """host_min_available_bytes: shrinks and grows the host tier (``tiers/host_pressure``)."""
        if config.host_min_available_bytes:
            self.pressure = HostPressure(
                self.tiers.host, slot_bytes, 1 if self.store_once else self.num_workers,
                config.host_min_available_bytes, config.host_regrow_after_s,
                available=file_available(config.debug_host_available_file)
                if config.debug_host_available_file else None)
            logger.info("TokenVM scheduler: host memory given back below %d bytes available "
                        "(margin %d, floor %d slots)", self.pressure.threshold,
                        self.pressure.margin, self.pressure.floor_slots)
        self.jobs = JobTable(self.num_workers)
        self._step_remote_lookups: list[RemoteLookup] = []
        self._step_remote_reads: list[RemoteBatch] = []
        self._remote_down_workers = 0
        """Workers whose remote store is unreachable: no lookups while any is."""
        self._remote_found: dict[int, list[int]] = {}
        """Lookup job -> each reporting worker's answer (blocks held, from the first)."""
        self._answered_failures: Counter[int] = Counter()
        """Job -> workers that reported it failed with an answer from the remote server (not
        a timeout): a remote read's block is gone from Redis only then."""
        self._loading: Counter[BlockKey] = Counter()
        """Keys of the load jobs in flight (a key may be in several: loads that began before
        this rule, or a request whose lookup timed the check out)."""
        self.remote_gate: RemoteGate | None = None
        """remote_reads='auto': reads a request's remote blocks only while that beats
        recomputing them (``policies/remote_gate.py``; fed by this class's hooks)."""
        if config.remote_url and config.remote_reads is RemoteReads.AUTO:
            self.remote_gate = RemoteGate()
        self._remote_skip_logged = False
        self.requests: dict[str, RequestState] = {}
        self._step_loads: list[CopyJob] = []
        self._step_disk_reads: list[DiskJob] = []
        self.stats = TokenVMStats()
        # At most half the host tier: a window larger than what host memory keeps would copy
        # blocks that evict each other, step after step, for ever.
        write_back_lookahead = max(1, min(
            config.write_back_lookahead_blocks
            or 2 * vllm_config.scheduler_config.max_num_batched_tokens // self.block_size,
            self.tiers.host.num_slots // 2))
        self.planner = StorePlanner(config, self.tiers, self.jobs, self.block_size,
                                    write_back_lookahead, groups=self.groups)
        self._disk_scans = 0
        self._disk_recovered: Counter[tuple[BlockKey, int]] = Counter()
        self._kv_cache_config = kv_cache_config
        self.elastic: SchedulerElastic | None = None
        """Elastic GPU KV (``config.elastic``): built when vLLM binds its block pool."""
        scheduler_config = vllm_config.scheduler_config
        # What one step can allocate at most: its token budget plus a block per sequence.
        self._max_step_blocks = len(self.groups) * (
            -(-scheduler_config.max_num_batched_tokens // self.block_size)
            + scheduler_config.max_num_seqs)
        self._watermark_blocks = int(
            getattr(scheduler_config, "watermark", 0.0) * kv_cache_config.num_blocks)
        disk = self.tiers.disk
        logger.info(
            "TokenVM scheduler: %d host slots of %d bytes, %s, block size %d, policy %s%s",
            self.tiers.host.num_slots, slot_bytes,
            f"{disk.num_slots} disk slots" if disk else "no disk tier",
            self.block_size, config.policy,
            "" if len(self.groups) == 1 else ", KV cache groups " + ", ".join(
                f"{g.index}: {len(g.layer_names)} layers "
                + ("full" if g.sliding_window is None else f"window {g.sliding_window}")
                for g in self.groups))

        if self.store_once:
            logger.info("TokenVM scheduler: MLA latent KV replicated on %d tensor-parallel "
                        "ranks: stored once per node (rank 0 writes, one host pool in %s)",
                        vllm_config.parallel_config.tensor_parallel_size, "/dev/shm")

    @staticmethod
    def _shared_pool_room() -> int:
        """What 'auto' may share out when the ranks share one pool in /dev/shm: MemAvailable,
        or /dev/shm's free space where that is smaller (a container's default 64 MiB)."""
        from tokenvm_vllm.connector.worker import SHARED_POOL_DIR

        stat = os.statvfs(SHARED_POOL_DIR)
        return min(mem_available()[0], stat.f_bavail * stat.f_frsize)

    # -- keys --------------------------------------------------------------------------------

    def block_keys(self, state: RequestState, start: int, stop: int) -> list[BlockKey]:
        """Keys of the request's blocks ``start..stop-1`` (each must be hashed already)."""
        keys = state.keys
        if len(keys) < stop:
            hashes = state.request.block_hashes
            per = self.hashes_per_block
            keys.extend(make_block_key(hashes[(i + 1) * per - 1]) for i in range(len(keys), stop))
        return keys[start:stop]

    def group_keys(self, state: RequestState, start: int, stop: int) -> list[BlockKey]:
        """Keys of the request's blocks ``start..stop-1`` in every KV cache group, block by
        block (prefix order: a prefix of this list is a prefix of every group's blocks)."""
        keys = self.block_keys(state, start, stop)
        if len(self.groups) == 1:
            return keys
        return [with_group(key, group.index) for key in keys for group in self.groups]

    def _hit_blocks(self, start: int, keys: list[BlockKey]) -> int:
        """How many blocks from ``start`` (``keys``: group 0's keys from there) every group can
        load now: the hit point ``h`` is where vLLM's coordinator will consider the request
        computed, and every group must be able to hold it. A full-attention group needs all of
        its blocks below ``h``; a sliding-window group only the blocks vLLM keeps for a
        request with ``h`` blocks computed (``GroupInfo.first_needed_block``: vLLM gives it
        null blocks below), so a window group's hit is found from the end."""
        if len(self.groups) == 1 and not self._window_groups:
            return self.tiers.lookup(keys)
        stop = start + len(keys)
        for index in self._full_groups:
            group_keys = [with_group(key, index) for key in keys[:stop - start]]
            stop = start + self.tiers.lookup(group_keys)
        while stop > start:
            for group in self._window_groups:
                first = max(start, group.first_needed_block(stop * self.block_size,
                                                            self.block_size))
                needed = [with_group(key, group.index) for key in keys[first - start:stop - start]]
                found = self.tiers.lookup(needed)
                if found < len(needed):
                    # Block first+found is missing: every hit point above it needs it (the
                    # window only moves up with the hit point), the one just below it does not.
                    stop = first + found
                    break
            else:
                break
        return stop - start

    def num_hashed_blocks(self, request: Request) -> int:
        return len(request.block_hashes) // self.hashes_per_block

    def _lookup_stop(self, request: Request) -> int:
        """Blocks a lookup may cover: hashed, and leaving one prompt token to compute (vLLM
        needs a forward to sample from)."""
        return min(self.num_hashed_blocks(request), (request.num_tokens - 1) // self.block_size)

    # -- vLLM scheduler hooks ---------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        if self.config.trace:  # bench/timeline.py: the engine's arrival -> first scheduled
            logger.info("TokenVM trace %.6f arrived req=%s", time.monotonic(), request.request_id)
        state = self.requests.setdefault(request.request_id, RequestState(request))
        if self.elastic is not None:
            self.elastic.between_steps(self._blocks_needed(state),
                                       serving=len(self.requests) > 1)  # others than this one
        state.prefetch_deadline = time.monotonic() + self.config.disk_prefetch_timeout_s
        # Queued and running requests will need their prefix: the queue-aware policy evicts
        # those blocks last (other policies ignore protect/unprotect).
        state.protected = self.group_keys(state, 0, self._lookup_stop(request))
        self.tiers.protect(state.protected)
        self._prefetch(state, state.protected)
        self._remote_prefetch(state, state.protected)

    def _prefetch(self, state: RequestState, keys: list[BlockKey]) -> None:
        """Start disk -> host promotions for the prefix ``keys`` that host memory lacks."""
        transfers = self.tiers.prepare_promotions(keys)
        for key, host_slot, disk_slot in transfers:
            job = self.jobs.add(JobKind.DISK_READ, [key], req_id=state.request.request_id)
            self._step_disk_reads.append(DiskJob(job, key, host_slot, disk_slot))
            state.promotions.add(job)
        state.prefetched_blocks += len(transfers)
        if transfers:
            state.prefetch_deadline = time.monotonic() + self.config.disk_prefetch_timeout_s

    def _remote_prefetch(self, state: RequestState, keys: list[BlockKey]) -> None:
        """Ask the remote tier (once per request) for the prefix blocks host and disk lack."""
        if state.remote_asked or not self.tiers.remote or self._remote_down_workers:
            return
        candidates = self.tiers.remote_candidates(keys)
        if not candidates:
            return
        state.remote_asked = True
        job = self.jobs.add(JobKind.REMOTE_LOOKUP, candidates, req_id=state.request.request_id)
        self._step_remote_lookups.append(RemoteLookup(job, candidates))
        state.remote_lookup = job
        state.prefetch_deadline = time.monotonic() + self.config.disk_prefetch_timeout_s
        self.stats.add("remote_lookup_blocks", len(candidates))

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        state = self.requests.setdefault(request.request_id, RequestState(request))
        state.hit_blocks = 0
        if self.elastic is not None:
            self.elastic.before_alloc(self._blocks_needed(state))
        if state.load_job_id is not None:
            return self._ask_again(state, "own-load")  # a load for it is still in flight
        start = state.local_blocks = num_computed_tokens // self.block_size
        stop = self._lookup_stop(request)
        if stop <= start:
            return 0, False
        keys = self.block_keys(state, start, stop)
        all_keys = self.group_keys(state, start, stop)
        if not state.promotions:
            self._prefetch(state, all_keys)  # blocks may have reached disk since arrival
        self._remote_prefetch(state, all_keys)
        waiting_for_disk = state.promotions or (
            self.tiers.disk is not None and not self.tiers.disk_ready) or (
            state.remote_lookup is not None or state.remote_reads)
        if waiting_for_disk and time.monotonic() < state.prefetch_deadline:
            self.stats.add("lookup_deferred", 1)
            state.lookup_deferred = True
            return self._ask_again(state, "disk")  # disk -> host in flight, or the scan
        if state.prefetched_blocks:
            late = state.lookup_deferred
            self.stats.add("prefetch_late_blocks" if late else "prefetch_on_time_blocks",
                           state.prefetched_blocks)
            state.prefetched_blocks, state.lookup_deferred = 0, False
        hits = self._hit_blocks(start, keys)
        if hits and self._loading and any(
                key in self._loading for key in self.group_keys(state, start, start + hits)):
            self.stats.add("lookup_deferred_loading", 1)
            return self._ask_again(state, "loading")  # another request loads these blocks now
        if hits >= self.config.min_load_blocks and self._defer_load(state):
            return self._ask_again(state, "defer")  # its load would evict the GPU's cache
        self.stats.add("lookup_blocks", len(keys))
        self.stats.add("host_hit_blocks", hits)
        if hits < self.config.min_load_blocks:
            return 0, False
        state.hit_blocks = hits
        if self.config.trace:
            logger.info("TokenVM trace %.6f lookup req=%s hit_blocks=%d", time.monotonic(),
                        request.request_id, hits)
        return hits * self.block_size, self.config.load_mode is LoadMode.ASYNC

    def _ask_again(self, state: RequestState, why: str) -> tuple[None, bool]:
        """vLLM's "ask again" answer to a lookup (the request stays waiting and vLLM goes on
        down its queue), traced with its reason (``bench/timeline.py``: per request)."""
        if self.config.trace:
            logger.info("TokenVM trace %.6f asked-again req=%s why=%s", time.monotonic(),
                        state.request.request_id, why)
        return None, False

    def _defer_load(self, state: RequestState) -> bool:
        """``load_defer_steps``: whether to answer "ask again" to a request whose prefix must be
        loaded, because (1) vLLM has fewer free uncached GPU blocks than the request allocates
        now, so allocating them would evict prefix-cached blocks, and (2) another waiting
        request's prefix starts on the GPU: vLLM then goes on down its queue and runs that one
        first, sharing the cached blocks instead of losing them to this load. Without (2) there
        is nothing to run instead and putting the load off only idles a slot (on CPU at 8 in
        flight: 9% more engine steps). Each request is put off at most that many times (once
        per step that vLLM reaches it in its queue) and, with ``load_defer_max_s``, only within
        that many seconds of the first time, so none waits long."""
        limit = self.config.load_defer_steps
        pool = self.planner.gpu_block_pool
        if not limit or pool is None or state.load_defers >= limit:
            return False
        now = time.monotonic()
        bound = self.config.load_defer_max_s
        if bound and state.load_defers and now - state.first_deferred >= bound:
            return False
        usable = (self.elastic.pool.usable_blocks if self.elastic is not None
                  else pool.num_gpu_blocks)
        uncached = compat.uncached_free_blocks(pool, usable)
        request = state.request
        needed = -(-request.num_tokens // self.block_size) - state.local_blocks
        if uncached >= needed or not self._gpu_hit_waiting(pool, request.request_id):
            return False
        if not state.load_defers:
            state.first_deferred = now
        state.load_defers += 1
        self.stats.add("load_deferred", 1)
        return True

    def _gpu_hit_waiting(self, pool: Any, but: str) -> bool:
        """Whether a waiting request other than ``but``, with no load of its own in flight, has
        its first block in vLLM's GPU prefix cache."""
        for req_id, other in self.requests.items():
            request = other.request
            if (req_id != but and other.load_job_id is None and compat.is_waiting(request)
                    and request.block_hashes
                    and compat.gpu_cached(pool, request.block_hashes[0])):
                return True
        return False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        state = self.requests.setdefault(request.request_id, RequestState(request))
        state.block_ids = [[block.block_id for block in group] for group in blocks.blocks]
        start = state.local_blocks
        # Blocks past vLLM's own prefix hit were just taken from the free queue: an in-flight
        # copy may still use them. (Local hits were in use or cached, so no copy targets them.)
        for ids in state.block_ids:
            self.jobs.reallocated(ids[start:])
        state.next_store_block = max(state.next_store_block, start)
        if num_external_tokens == 0:
            return
        # A partial last block is loaded whole: its extra tokens are recomputed over it.
        num_blocks = -(-num_external_tokens // self.block_size)
        assert num_blocks <= state.hit_blocks, "vLLM asked for more than TokenVM offered"
        keys, gpu_block_ids, groups = self._blocks_to_load(state, start, start + num_blocks)
        slots = self.tiers.prepare_load(keys)
        job = self.jobs.add(JobKind.LOAD, keys, gpu_block_ids, req_id=request.request_id)
        self._loading.update(keys)
        mode = self.config.load_mode
        self._step_loads.append(CopyJob(job, gpu_block_ids, slots, req_id=request.request_id,
                                        layerwise=mode is LoadMode.LAYERWISE,
                                        sync=mode is LoadMode.SYNC,
                                        groups=groups if len(self.groups) > 1 else None))
        if mode.runs_in_step:
            state.in_step_load = (job, start)
        else:
            state.load_job_id = job  # parked until the job finishes; the others run now
        state.next_store_block = max(state.next_store_block, start + num_blocks)
        self.stats.add("loaded_blocks", len(keys))
        if mode is LoadMode.SYNC:
            self.stats.add("sync_loaded_blocks", len(keys))

    def _blocks_to_load(
        self, state: RequestState, start: int, stop: int
    ) -> tuple[list[BlockKey], list[int], list[int]]:
        """(keys, GPU blocks, groups) to load for blocks ``start..stop-1``: every group's
        blocks that vLLM allocated (a sliding-window group has null blocks below its window,
        which are not loaded). ``_hit_blocks`` checked that each of them is READABLE."""
        base = self.block_keys(state, start, stop)
        keys: list[BlockKey] = []
        gpu_block_ids: list[int] = []
        groups: list[int] = []
        for group in self.groups:
            index = group.index
            ids = state.block_ids[index]
            for i, key in enumerate(base, start):
                if i < len(ids) and ids[i] != compat.NULL_BLOCK_ID:
                    # (``block_keys`` are group 0's keys: no new bytes for group 0)
                    keys.append(with_group(key, index) if index else key)
                    gpu_block_ids.append(ids[i])
                    groups.append(index)
        return keys, gpu_block_ids, groups

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> TokenVMConnectorMetadata:
        trace = self.config.trace and scheduler_output.total_num_scheduled_tokens > 0
        if trace:
            logger.info("TokenVM trace %.6f step-scheduled tokens=%d", time.monotonic(),
                        scheduler_output.total_num_scheduled_tokens)
        admitted = {new.req_id for new in scheduler_output.scheduled_new_reqs} if trace else set()
        for req_id, new_block_ids, resumed in compat.yield_req_data(scheduler_output):
            if req_id in admitted or (trace and resumed):
                # its first tokens since admission (after its load, if it had one) run in this
                # step: bench/timeline.py measures load-finished -> here
                logger.info("TokenVM trace %.6f scheduled-new req=%s", time.monotonic(), req_id)
            state = self.requests.get(req_id)
            if state is None or new_block_ids is None:
                continue
            if resumed:
                state.block_ids = [list(ids) for ids in new_block_ids]
            elif req_id in scheduler_output.scheduled_cached_reqs.req_ids:
                if len(state.block_ids) != len(new_block_ids):
                    state.block_ids = [[] for _ in new_block_ids]
                for ids, new_ids in zip(state.block_ids, new_block_ids, strict=True):
                    ids.extend(new_ids)
                    self.jobs.reallocated(new_ids)
        for req_id in scheduler_output.preempted_req_ids or ():
            state = self.requests.get(req_id)
            if state is not None:
                state.block_ids = []
        # Before planning stores: a shrink's slots take no new block from this step on.
        host_commands = self.pressure.step() if self.pressure is not None else []
        if self.elastic is not None:
            if (self.elastic.awaiting_idle_shrink and not self.requests
                    and scheduler_output.total_num_scheduled_tokens == 0
                    and not self.has_pending_work(idle=False)):
                time.sleep(IDLE_TICK_S)  # an empty step only to wait out the idle period
            # may hand blocks to the planner's spill list (only once no request is left)
            self.elastic.end_of_schedule(serving=bool(self.requests))
        store = self.planner.plan_store(scheduler_output, self.requests, self.block_keys,
                                        self.num_hashed_blocks)
        if store is not None:
            self.stats.add("stored_blocks", len(store.gpu_block_ids))
        disk_writes = self.planner.plan_disk_writes()
        remote_writes = self.planner.plan_remote_writes()
        elastic_commands, elastic_reserve = (
            self.elastic.take_commands() if self.elastic is not None else ([], 0))
        fence_job_ids = self.jobs.send()  # this step's jobs are never fenced, only older ones
        self.stats.add("fenced_jobs", len(fence_job_ids))
        meta = TokenVMConnectorMetadata(
            loads=self._step_loads, store=store, fence_job_ids=fence_job_ids,
            disk_reads=self._step_disk_reads, disk_writes=disk_writes,
            disk_invalidations=self.tiers.take_freed_disk_slots(),
            remote_lookups=self._step_remote_lookups, remote_reads=self._step_remote_reads,
            remote_writes=remote_writes, host_slots=self.tiers.host.num_slots,
            elastic_commands=elastic_commands, elastic_reserve=elastic_reserve,
            host_commands=host_commands, host_moves=self.tiers.host.take_moves())
        if self.remote_gate is not None:
            # The step's forward starts once this returns: its compute and its reads are timed
            # from here (to update_connector_output).
            self.remote_gate.reads_submitted(sum(len(batch.keys)
                                                 for batch in self._step_remote_reads))
            self.remote_gate.step_scheduled(scheduler_output.total_num_scheduled_tokens)
        self._step_loads = []
        self._step_disk_reads = []
        self._step_remote_lookups = []
        self._step_remote_reads = []
        if self.elastic is not None:  # map ahead for the next step's allocations
            self.elastic.after_meta(sum(
                self._blocks_needed(state) for state in self.requests.values()))
        return meta

    def _blocks_needed(self, state: RequestState) -> int:
        """Blocks ``state``'s request still needs for its prompt and one more token, in every
        KV cache group (an over-estimate: local prefix hits need no new block)."""
        have = min((len(ids) for ids in state.block_ids), default=0)
        return blocks_needed(state.request.num_tokens, have, self.block_size, len(self.groups))

    def bind_gpu_block_pool(self, block_pool: Any) -> None:
        self.planner.gpu_block_pool = block_pool
        if self.config.elastic and self.elastic is None:
            self.elastic = self._make_elastic(block_pool)

    def _make_elastic(self, block_pool: Any) -> SchedulerElastic:
        def is_spilled(key: BlockKey) -> bool:
            index = self.tiers.index
            return index.is_readable(key, Tier.HOST) or index.is_readable(key, Tier.DISK)

        def request_store(pairs: list[tuple[BlockKey, int]]) -> None:
            self.planner.spill.extend(pairs)

        def spill_capacity() -> int:
            # Three quarters of what host (as far as memory pressure leaves it) and disk hold:
            # the rest stays for blocks pinned by loads and stores in flight.
            disk = self.tiers.disk.num_slots if self.tiers.disk is not None else 0
            return (self.tiers.host.usable_slots + disk) * 3 // 4

        return SchedulerElastic(
            block_pool, self._kv_cache_config, self.config, is_spilled=is_spilled,
            request_store=request_store, spill_capacity=spill_capacity,
            reserve_blocks=self._watermark_blocks + len(self.groups),
            max_step_blocks=self._max_step_blocks, workers=self.num_workers,
            free_probe=(compat.device_free_bytes_probe(self._vllm_config)
                        if self.config.gpu_free_target_bytes else None))

    # -- planning copies out (connector/store_planner.py) -------------------------------------

    def _plan_remote_reads(self, state: RequestState | None, keys: list[BlockKey]) -> None:
        """The remote tier holds ``keys`` (a request's prefix blocks): read them into host,
        unless ``remote_gate`` expects recomputing them to be faster (then they are counted
        as skipped and the request computes them)."""
        gate = self.remote_gate
        tokens = -(-len(keys) // len(self.groups)) * self.block_size
        if gate is not None and not gate.should_read(len(keys), tokens):
            self.stats.add("remote_skipped_blocks", len(keys))
            if not self._remote_skip_logged:
                self._remote_skip_logged = True
                logger.info("TokenVM remote tier: recomputing instead of reading %d blocks "
                            "(%s; remote_reads=auto, counted as remote_skipped_blocks; "
                            "remote_reads=always reads them)", len(keys), gate.describe())
            return
        reads = self.tiers.prepare_remote_reads(keys)
        if not reads:
            return
        req_id = state.request.request_id if state is not None else None
        job_ids = [self.jobs.add(JobKind.REMOTE_READ, [key], req_id=req_id) for key, _ in reads]
        self._step_remote_reads.append(
            RemoteBatch(job_ids, [key for key, _ in reads], [slot for _, slot in reads]))
        if state is not None:
            state.remote_reads.update(job_ids)
            state.prefetched_blocks += len(reads)

    # -- completions ---------------------------------------------------------------------------

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self.early_finish is not None:
            # vLLM reads finished_recving after this call: requests added here are scheduled
            # at the next schedule(), a step or two before the worker's report would arrive.
            connector_output.finished_recving, early = self.early_finish.claim(
                connector_output.finished_recving)
            if early:
                self._loads_finished_early(early)
        if self.remote_gate is not None:
            self.remote_gate.step_finished()  # the oldest step in flight ended
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, TokenVMWorkerMetadata):
            return
        for name in ("load_bytes", "store_bytes", "load_seconds", "store_seconds",
                     "layerwise_loaded_blocks"):
            self.stats.add(name, getattr(meta, name))
        for name in ("load_job_seconds", "store_job_seconds", "disk_io_seconds",
                     "remote_io_seconds", "elastic_apply_seconds"):
            self.stats.observe(name, getattr(meta, name))
        for name in REMOTE_STORE_COUNTERS:  # (block outcomes are counted by the tier manager)
            if meta.remote_counts[name]:
                self.stats.add(f"remote_{name}", meta.remote_counts[name])
        if meta.remote_went_down or meta.remote_came_back:
            self._remote_down_workers = max(
                0, self._remote_down_workers + meta.remote_went_down - meta.remote_came_back)
            logger.info("TokenVM remote tier: %s", "back, lookups resume"
                        if not self._remote_down_workers else
                        f"unreachable from {self._remote_down_workers} worker(s), no lookups")
        for (job_id, found), workers in meta.remote_found.items():
            self._remote_found.setdefault(job_id, []).extend([found] * workers)
        if self.elastic is not None:
            self.elastic.reported(meta.elastic_reserve)
        if meta.disk_scanned:
            self._adopt_disk_blocks(meta)
        finished_reads = delivered_reads = 0
        for job_id, count in meta.completed.items():
            failed = meta.failed.get(job_id, 0)
            answered = failed - meta.remote_unanswered.get(job_id, 0)
            if answered:  # (popped when the job finishes, whatever its kind)
                self._answered_failures[job_id] += answered
            job = self.jobs.report(job_id, count, failed)
            if job is not None:
                self._finish_job(job)
                if job.kind is JobKind.REMOTE_READ:
                    finished_reads += 1
                    delivered_reads += job.state is JobState.DONE
        if self.remote_gate is not None:  # one observation per step (reads end step by step)
            self.remote_gate.reads_finished(finished_reads, delivered_reads)

    def _loads_finished_early(self, req_ids: set[str]) -> None:
        """``load_early_finish`` handed these requests to vLLM; their jobs finish (host slots
        unpinned, tiers updated) when the worker reports them, as every job does."""
        self.stats.add("load_early_finished", len(req_ids))
        for req_id in req_ids:
            state = self.requests.get(req_id)
            job_id = state.load_job_id if state is not None else None
            if job_id is not None:
                # The copy ended: vLLM may now give the request's blocks new owners (and run
                # the request itself) without a fence on this job.
                self.jobs.copied(job_id)
            if self.config.trace:  # bench/timeline.py takes a job's first load-finished
                logger.info("TokenVM trace %.6f load-finished job=%d req=%s early=1",
                            time.monotonic(), -1 if job_id is None else job_id, req_id)

    def _adopt_disk_blocks(self, meta: TokenVMWorkerMetadata) -> None:
        """Take over what every worker's start-up scan found (the same key in the same slot)."""
        self._disk_scans += meta.disk_scanned
        self._disk_recovered.update(meta.disk_recovered)
        scanners = 1 if self.store_once else self.num_workers  # (store_once: rank 0's store)
        if self._disk_scans < scanners or self.tiers.disk_ready:
            return
        found = {key: slot for (key, slot), count in self._disk_recovered.items()
                 if count == scanners}
        adopted = self.tiers.adopt_disk(found)
        self._disk_recovered.clear()
        logger.info("TokenVM disk tier ready: %d blocks recovered from %s", adopted,
                    self.config.disk_path)

    def _finish_job(self, job: Job) -> None:
        """Every worker reported ``job``: complete its tier movement."""
        ok = job.state is JobState.DONE
        answered_failures = self._answered_failures.pop(job.job_id, 0)
        state = self.requests.get(job.req_id) if job.req_id is not None else None
        if job.kind is JobKind.STORE:
            self.tiers.complete_store(job.keys, ok)
        elif job.kind is JobKind.LOAD:
            self.tiers.complete_load(job.keys, ok)
            self._loading.subtract(job.keys)
            for key in job.keys:
                if self._loading[key] <= 0:
                    del self._loading[key]
            if self.config.trace:
                logger.info("TokenVM trace %.6f load-finished job=%d req=%s blocks=%d",
                            time.monotonic(), job.job_id, job.req_id, len(job.keys))
            if state is not None and state.load_job_id == job.job_id:
                state.load_job_id = None
            if state is not None and state.in_step_load is not None:
                load_job, first = state.in_step_load
                if load_job == job.job_id:
                    state.in_step_load = None
                    if not ok:  # vLLM recomputes from the first failed block: store it again
                        state.next_store_block = min(state.next_store_block, first)
        elif job.kind is JobKind.REMOTE_LOOKUP:
            answers = self._remote_found.pop(job.job_id, [])
            found = min(answers) if ok and len(answers) == self.num_workers else 0
            self.stats.add("remote_miss_blocks", len(job.keys) - found)
            if state is not None:
                state.remote_lookup = None
            self.tiers.note_in_remote(job.keys[:found])  # (not written back if recomputed)
            if found and (state is not None or job.req_id is None):
                self._plan_remote_reads(state, job.keys[:found])
        elif job.kind is JobKind.REMOTE_READ:
            # Gone from Redis only if some worker's server said so; a read that got no answer
            # (timed out) leaves the block known there, so its recompute is not written back.
            self.tiers.complete_remote_read(job.keys[0], ok, gone=answered_failures > 0)
            if state is not None:
                state.remote_reads.discard(job.job_id)
        elif job.kind is JobKind.REMOTE_WRITE:
            self.tiers.complete_remote_write(job.keys[0], ok)
        elif job.kind is JobKind.DISK_READ:
            self.tiers.complete_promotion(job.keys[0], ok)
            if state is not None:
                state.promotions.discard(job.job_id)
        else:
            self.tiers.complete_demotion(job.keys[0], ok)

    # -- request end, engine queries -----------------------------------------------------------

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Never delays the free: in-flight copies of freed blocks are fenced on re-use. (vLLM
        calls it through ``request_finished_all_groups`` for every model: one call, all
        groups.)"""
        state = self.requests.pop(request.request_id, None)
        if state is not None and state.protected:
            self.tiers.unprotect(state.protected)
        return False, None

    def has_pending_work(self, idle: bool = True) -> bool:
        """Keep the engine stepping while copies are in flight, so their completions arrive;
        in elastic mode until the first step after start-up (it ends the workers' warm-up
        mapping) and, with ``idle``, while it waits out an idle period to shrink (an idle
        vLLM engine does not step: without these empty steps the memory would stay mapped
        until the next request; ``build_connector_meta`` paces them, ``IDLE_TICK_S``)."""
        return len(self.jobs) > 0 or self.tiers.has_pending_work() or (
            self.elastic is not None and (
                self.elastic.warm_up_pending or self.elastic.shrink_pending or (
                    idle and self.elastic.awaiting_idle_shrink))) or (
            self.pressure is not None and self.pressure.pending)

    def get_stats(self) -> TokenVMStats | None:
        for name, count in self.tiers.get_stats().items():
            self.stats.add(name, count)
        if self.elastic is not None:
            self.elastic.export(self.stats)
        if self.pressure is not None:
            self.pressure.export(self.stats)
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, TokenVMStats()
        return stats

    def reset_cache(self) -> bool:
        """Drop every unpinned host and disk block (vLLM's ``reset_prefix_cache``)."""
        self.tiers.evict()
        return True
