"""The CUDA copy engine: batched copies per direction per step, on dedicated streams.

Stores (GPU -> host) and loads (host -> GPU) each run on their own CUDA stream, so they overlap
the forward pass on the compute stream and each other. Two paths (``copy_path``):

- ``staged`` (default): a Triton kernel (``triton_gather.py``) gathers the job's blocks of all
  layers from vLLM's per-layer tensors into a GPU staging buffer of slot rows (HBM to HBM: a
  fraction of a millisecond), then DMA (``dma.py``, the GPU's copy engines) moves whole slot
  rows to the pinned host pool; loads run the reverse. The SMs are busy only for the short
  on-device gather/scatter. Why: under serving load the ``uva`` path's kernel held SMs for the
  whole PCIe transfer and the decode steps beside it slowed (issue #10: TPOT 2x on an H200 with
  no reuse at all, while vLLM's DMA-only native offloading cost 0.7%).
- ``uva``: the kernel reads and writes the pinned host pool directly through unified virtual
  addressing: one launch, no staging buffer, the highest bandwidth for a lone copy (93% of the
  pinned-memcpy peak on an H100), but its programs hold SMs for the whole transfer.
- ``dma``: no kernel at all: one ``cuMemcpyBatchAsync`` per job with one copy per chunk of each
  block (a layer's K or V block on the V2 runner: 64 copies of 32 KiB per Llama-3.1-8B block),
  between vLLM's tensors and the host slots (``dma.chunk_copies``). This is what vLLM's native
  offloading does on V2; against ``staged`` it trades the short gather kernel on the SMs for
  many small DMA descriptors (not yet measured on a GPU).

Layer-wise loads always use the ``uva`` path (one launch per layer, each with its own event).

Ordering, per the ``CopyEngine`` contract:
- a job first waits (on the GPU) for an event recorded on the compute stream when it was
  submitted, so a store sees the KV the forward queued before it wrote, and a load cannot be
  overwritten by a forward still running over the blocks' previous owner;
- ``fence`` makes the compute stream wait for a job's completion event (no CPU stall);
- ``load_layers`` launches one copy per layer (a mover per layer) and records an event after
  each, so ``wait_layer`` makes the compute stream wait for one layer only: layer i's attention
  starts while later layers are still crossing PCIe;
- ``poll`` queries completion events in submission order, without blocking.

The number of Triton programs per launch is capped: PCIe, not the SMs, bounds host copies, and
an uncapped grid slows the forward on the compute stream (measured on an H100: a concurrent
8192^3 bf16 matmul ran 3.1x slower uncapped, 1.2x slower with 8 programs, while 8 programs still
moved 52 GB/s GPU -> host and 16 programs 51 GB/s host -> GPU).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from tokenvm_vllm import compat
from tokenvm_vllm.config import CopyPath
from tokenvm_vllm.transfer import dma
from tokenvm_vllm.transfer.copy_engine import CopyEngine, CopyResult
from tokenvm_vllm.transfer.host_pool import HostPool
from tokenvm_vllm.transfer.layout import KVLayout
from tokenvm_vllm.transfer.triton_gather import TritonBlockMover, layer_movers

logger = logging.getLogger("vllm.tokenvm")

STORE_PROGRAMS = 8
LOAD_PROGRAMS = 16
DEFAULT_STAGING_BYTES = 128 * 2**20


class PinnedIdStaging:
    """Pinned host columns for the (GPU block, host slot) id pairs of the jobs in flight.

    Why not ``torch.tensor(...).pin_memory()`` per job: for a size its cache lacks, torch's
    pinned allocator calls ``cudaHostAlloc`` (slow, and not promised to be asynchronous) in the
    middle of an engine step. This buffer is allocated once; jobs take consecutive columns, and
    columns are reused only after the copy that read them completed (normally long before the
    ring comes round again).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer = torch.empty((2, capacity), dtype=torch.int64, pin_memory=True)
        self._next = 0
        self._in_use: list[tuple[int, int, torch.cuda.Event]] = []
        """(first column, end column, event recorded after the copy that reads them)"""

    def to_device(
        self, gpu_block_ids: list[int], host_slots: list[int], device: torch.device
    ) -> torch.Tensor:
        """The id pairs as a (2, n) int64 tensor on ``device``, copied on the current stream."""
        n = len(gpu_block_ids)
        if n > self.capacity:  # larger than any job the engine expects: pin just this one
            pinned = torch.tensor([gpu_block_ids, host_slots], dtype=torch.int64).pin_memory()
            return pinned.to(device, non_blocking=True)
        start = self._next if self._next + n <= self.capacity else 0
        stop = start + n
        for first, end, read in self._in_use:
            if first < stop and start < end:
                read.synchronize()  # the ring came round before that copy ran: rare
        self._in_use = [entry for entry in self._in_use if not entry[2].query()]
        self.buffer[0, start:stop] = torch.tensor(gpu_block_ids, dtype=torch.int64)
        self.buffer[1, start:stop] = torch.tensor(host_slots, dtype=torch.int64)
        on_device = self.buffer[:, start:stop].to(device, non_blocking=True)
        read = torch.cuda.Event()
        read.record(torch.cuda.current_stream(device))
        self._in_use.append((start, stop, read))
        self._next = stop
        return on_device


@dataclass
class _Job:
    is_load: bool
    num_blocks: int
    start: torch.cuda.Event
    end: torch.cuda.Event
    tensors: tuple[torch.Tensor, ...]
    """Index tensors the kernel reads; kept alive until the job completes."""
    layer_done: list[torch.cuda.Event] | None = None
    """``load_layers`` jobs: one event per layer, recorded when that layer's copy is done."""


class CudaCopyEngine(CopyEngine):
    """Asynchronous batched copies between vLLM's CUDA KV cache and a pinned ``HostPool``."""

    def __init__(
        self, layout: KVLayout, kv_caches: dict[str, torch.Tensor], pool: HostPool,
        store_programs: int = STORE_PROGRAMS, load_programs: int = LOAD_PROGRAMS,
        path: CopyPath | str = CopyPath.STAGED, staging_bytes: int = DEFAULT_STAGING_BYTES,
    ) -> None:
        super().__init__(layout, kv_caches, pool)
        if not pool.pinned:
            raise ValueError("tokenvm: the CUDA copy engine needs a pinned host pool "
                             "(pin_memory=true)")
        self.path = CopyPath(path)  # ValueError names the bad value
        self.device = self.kv_caches[0].device
        self.store_stream = torch.cuda.Stream(self.device)
        self.load_stream = torch.cuda.Stream(self.device)
        self.store_mover = TritonBlockMover(layout, self.kv_caches, max_programs=store_programs)
        self.load_mover = TritonBlockMover(layout, self.kv_caches, max_programs=load_programs)
        self.layer_load_movers = layer_movers(layout, self.kv_caches, max_programs=load_programs)
        self.block_bytes = sum(layer.nbytes for layer in layout.layers)
        self.num_blocks = self.kv_caches[0].shape[layout.layers[0].block_dim]
        self._ids = PinnedIdStaging(4 * self.num_blocks)
        # Staging rows: one buffer per direction, so a store and a load never share rows. The
        # on-device movers are uncapped: HBM-to-HBM copies finish in microseconds per block.
        if self.path is CopyPath.DMA:
            batch = compat.dma_batch_copy()
            if batch is None:
                raise ValueError("tokenvm: copy_path='dma' needs vLLM's swap_blocks_batch, which "
                                 "this vLLM build lacks; use copy_path='staged'")
            self._batch_copy = batch
        rows = max(1, min(staging_bytes // pool.slot_bytes, self.num_blocks))
        staged = self.path is CopyPath.STAGED
        self.staging_rows = rows if staged else 0
        self.direct_rows = self._block_rows() if staged else None
        """A layout whose block is one contiguous slot-sized row (vLLM's cross-layer KV cache):
        DMA straight between those rows and the host slots, no staging and no kernel."""
        if self.direct_rows is not None:
            self.staging_rows = 0
        elif staged:
            if staging_bytes < pool.slot_bytes:
                raise ValueError(
                    f"tokenvm: staging_bytes={staging_bytes} is smaller than one block of all "
                    f"layers ({pool.slot_bytes} bytes); raise it or use copy_path='uva'")
            self.stage_mover = TritonBlockMover(layout, self.kv_caches)
            self.store_staging = torch.empty((rows, pool.slot_bytes), dtype=torch.uint8,
                                             device=self.device)
            self.load_staging = torch.empty_like(self.store_staging)
        self._jobs: OrderedDict[int, _Job] = OrderedDict()
        self._warm_up()
        sizes = sorted({chunk.nbytes for chunk in self.store_mover.chunks})
        logger.info("TokenVM CUDA copy engine: %d chunks per block, chunk sizes %s bytes",
                    len(self.store_mover.chunks), sizes[:4])

    def _warm_up(self) -> None:
        """Compile and load every kernel variant now, not inside the first steps that copy.

        Measured on an H100 with CUDA graphs on: the first store's Triton compile took 279 ms
        inside a request's step. A kernel's first launch also loads its module, which (with
        CUDA's lazy loading) can wait for work on every stream. Variants: gather and scatter,
        the per-layer movers, and an odd and an even number of blocks (the row-id pointer's
        16-byte alignment is part of Triton's specialization). Blocks 0 and 1 go to slots 0 and
        1 and back: their bytes are unchanged, and at start-up no request owns them.
        """
        for n in (1, 2):
            if n > min(self.num_blocks, self.pool.num_slots):
                break
            job = -n
            self.store(job, list(range(n)), list(range(n)))
            self.fence({job})
            self.load(job - 10, list(range(n)), list(range(n)))
            self.fence({job - 10})
            self.load_layers(job - 20, list(range(n)), list(range(n)))
            self.fence({job - 20})
        torch.cuda.synchronize(self.device)
        self.poll()

    def store(self, job_id: int, gpu_block_ids: list[int], host_slots: list[int]) -> None:
        self._submit(job_id, False, gpu_block_ids, host_slots)

    def load(self, job_id: int, gpu_block_ids: list[int], host_slots: list[int]) -> None:
        self._submit(job_id, True, gpu_block_ids, host_slots)

    def load_layers(self, job_id: int, gpu_block_ids: list[int], host_slots: list[int]) -> None:
        self._submit(job_id, True, gpu_block_ids, host_slots, by_layer=True)

    def _submit(
        self, job_id: int, is_load: bool, gpu_block_ids: list[int], host_slots: list[int],
        by_layer: bool = False,
    ) -> None:
        # A lazily pinned pool: the chunks under these slots must be registered before a DMA
        # or a kernel touches them (a no-op once the background thread is past them).
        self.pool.ensure_pinned(host_slots)
        submitted = torch.cuda.Event()
        submitted.record(torch.cuda.current_stream(self.device))
        stream = self.load_stream if is_load else self.store_stream
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        layer_done: list[torch.cuda.Event] | None = None
        with torch.cuda.stream(stream):
            stream.wait_event(submitted)
            start.record(stream)
            if self.path is CopyPath.STAGED and not by_layer:
                kept = self._staged(is_load, gpu_block_ids, host_slots)
            elif self.path is CopyPath.DMA and not by_layer:
                kept = self._dma(is_load, gpu_block_ids, host_slots)
            else:
                ids_gpu = self._ids.to_device(gpu_block_ids, host_slots, self.device)
                kept = [ids_gpu]
                if by_layer:
                    layer_done = []
                    for mover in self.layer_load_movers:
                        mover.scatter(self.pool.buffer, ids_gpu[0], src_row_ids=ids_gpu[1])
                        layer_done.append(torch.cuda.Event())
                        layer_done[-1].record(stream)
                elif is_load:
                    self.load_mover.scatter(self.pool.buffer, ids_gpu[0],
                                            src_row_ids=ids_gpu[1])
                else:
                    self.store_mover.gather(ids_gpu[0], self.pool.buffer,
                                            dst_row_ids=ids_gpu[1])
            end.record(stream)
        self._jobs[job_id] = _Job(is_load, len(gpu_block_ids), start, end, tuple(kept),
                                  layer_done)

    def _dma(
        self, is_load: bool, gpu_block_ids: list[int], host_slots: list[int]
    ) -> list[torch.Tensor]:
        """Queue a ``dma`` job on the current stream: every chunk of every block in one batched
        DMA call (``dma.chunk_copies``). Returns nothing to keep alive (the pointer tensors are
        read by the driver during the call)."""
        kv_ptrs, host_ptrs, sizes = dma.chunk_copies(
            self.store_mover.chunks, gpu_block_ids, host_slots, self.pool.slot_bytes,
            self.pool.buffer.data_ptr(), self.pool.pin_chunk_bytes)
        if is_load:
            self._batch_copy(host_ptrs, kv_ptrs, sizes)
        else:
            self._batch_copy(kv_ptrs, host_ptrs, sizes)
        return []

    def _block_rows(self) -> torch.Tensor | None:
        """The KV cache as one ``(blocks, slot_bytes)`` byte matrix, if it is exactly that."""
        if len(self.layout.layers) != 1:
            return None
        (layer,), kv = self.layout.layers, self.kv_caches[0]
        rows = layer.blocks_view(kv)
        if (layer.block_dim != 0 or layer.nbytes != self.pool.slot_bytes
                or not rows.is_contiguous()):
            return None
        return rows.reshape(rows.shape[0], -1).view(torch.uint8)

    def _staged(
        self, is_load: bool, gpu_block_ids: list[int], host_slots: list[int]
    ) -> list[torch.Tensor]:
        """Queue a staged job on the current (store or load) stream, ``staging_rows`` blocks
        at a time: gather to staging rows then DMA to host slots, or DMA then scatter. Stream
        order makes each round's rows free before the next round writes them. Blocks go in host
        slot order so that consecutive slots become one DMA run. Returns the id tensors the
        kernels read (kept alive until the job completes)."""
        order = sorted(range(len(host_slots)), key=host_slots.__getitem__)
        split = self.pool.pin_chunk_bytes  # no DMA may span two of the pool's registrations
        if self.direct_rows is not None:
            ids = [gpu_block_ids[i] for i in order]
            slots = [host_slots[i] for i in order]
            if is_load:
                dma.copy_rows(self.pool.buffer, self.direct_rows, slots, ids, src_split=split)
            else:
                dma.copy_rows(self.direct_rows, self.pool.buffer, ids, slots, dst_split=split)
            return []
        staging = self.load_staging if is_load else self.store_staging
        kept = []
        for first in range(0, len(order), self.staging_rows):
            part = order[first:first + self.staging_rows]
            ids = [gpu_block_ids[i] for i in part]
            slots = [host_slots[i] for i in part]
            ids_gpu = self._ids.to_device(ids, slots, self.device)
            kept.append(ids_gpu)
            rows = range(len(part))
            if is_load:
                dma.copy_rows(self.pool.buffer, staging, slots, rows, src_split=split)
                self.stage_mover.scatter(staging, ids_gpu[0])
            else:
                self.stage_mover.gather(ids_gpu[0], staging)
                dma.copy_rows(staging, self.pool.buffer, rows, slots, dst_split=split)
        return kept

    def poll(self) -> list[CopyResult]:
        done = []
        for job_id, job in list(self._jobs.items()):
            if not job.end.query():
                continue
            seconds = job.start.elapsed_time(job.end) / 1000.0
            done.append(CopyResult(job_id, True, job.num_blocks * self.block_bytes, seconds,
                                   is_load=job.is_load))
            del self._jobs[job_id]
        return done

    def fence(self, job_ids: set[int]) -> None:
        compute = torch.cuda.current_stream(self.device)
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is not None:
                compute.wait_event(job.end)

    def wait_layer(self, job_ids: set[int], layer: int) -> None:
        compute = torch.cuda.current_stream(self.device)
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is None:
                continue  # polled: complete
            compute.wait_event(job.end if job.layer_done is None else job.layer_done[layer])

    def shutdown(self) -> None:
        for job in self._jobs.values():
            job.end.synchronize()
