"""Copy engines: move whole blocks between vLLM's KV cache and the host pool, in batches.

One ``CopyEngine`` per worker. Each ``store``/``load`` call is one job over many blocks (all the
blocks of one engine step in one direction), so the fixed cost of a copy is paid per step, not per
block. Results come back through ``poll``; ``fence`` makes later KV-cache writes wait for jobs
that still read or write blocks the scheduler just handed to another request.

``TorchCopyEngine`` (this file) is the reference implementation with torch indexing: it runs on
the CPU platform, where vLLM's "GPU" cache is host memory, and copies synchronously. The CUDA
engine (``cuda_copy_engine.py``) implements the same contract with streams and events.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenvm_vllm.transfer.host_pool import HostPool
from tokenvm_vllm.transfer.layout import KVLayout
from tokenvm_vllm.transfer.mover import Mover, MoveResult


@dataclass(frozen=True)
class CopyResult(MoveResult):
    """A finished copy job; ``is_load``: host -> GPU (else GPU -> host)."""

    is_load: bool = False


class CopyEngine(Mover):
    """Batched block copies between vLLM's paged KV cache and a ``HostPool`` (a ``Mover``).

    Contract:
    - ``store`` reads the GPU blocks only after all work already queued on the compute stream
      (so it sees the KV the current forward writes) and writes the host slots.
    - ``load`` writes the GPU blocks; the scheduler runs no forward over them until ``poll``
      has returned the job.
    - ``load_layers`` is ``load`` for a request that runs in the same step: each layer's part
      may land separately; ``wait_layer(job_ids, i)`` makes KV-cache reads and writes of layer
      ``i`` queued after the call wait for those jobs' layer ``i`` (``fence`` waits for all).
    - ``fence(job_ids)``: KV-cache writes queued after this call start only after those jobs
      finished (a no-op for jobs already polled, or for a synchronous engine).
    - ``poll`` returns each submitted job exactly once, when its copy is complete.
    """

    def __init__(self, layout: KVLayout, kv_caches: dict[str, torch.Tensor], pool: HostPool):
        self.layout = layout
        self.kv_caches = [kv_caches[layer.name] for layer in layout.layers]
        self.pool = pool

    @abstractmethod
    def store(self, job_id: int, gpu_block_ids: list[int], host_slots: list[int]) -> None: ...

    @abstractmethod
    def load(self, job_id: int, gpu_block_ids: list[int], host_slots: list[int]) -> None: ...

    def load_layers(self, job_id: int, gpu_block_ids: list[int], host_slots: list[int]) -> None:
        """A load whose layers ``wait_layer`` can wait for one by one (default: one job)."""
        self.load(job_id, gpu_block_ids, host_slots)

    def wait_layer(self, job_ids: set[int], layer: int) -> None:
        """Order later work on layer ``layer`` after those jobs' copy of it (default: all of
        the jobs, which is correct, only later than needed)."""
        self.fence(job_ids)

    @abstractmethod
    def poll(self) -> list[CopyResult]: ...

    @abstractmethod
    def fence(self, job_ids: set[int]) -> None: ...

    def corrupt_blocks(self, gpu_block_ids: list[int]) -> None:
        """Testing only (``debug_corrupt_loads``): flip a high byte of the first element of each
        block's part in every layer. The caller orders it after the loads that wrote the blocks
        (polled, or fenced on the current stream, where these writes are queued)."""
        for layer, kv in zip(self.layout.layers, self.kv_caches, strict=True):
            for block_id in gpu_block_ids:
                block = kv.select(layer.block_dim, block_id)
                first = block[(0,) * block.dim()].view(1).view(torch.uint8)
                first[-1] ^= 0x40


class TorchCopyEngine(CopyEngine):
    """Synchronous copies with torch indexing; every job is complete when its call returns.

    ``lag`` (testing only, ``debug_lag_copies``): each copy runs at the first ``poll`` after
    its call and is returned by the next one, as a CUDA copy queued beside a step's forward is
    still running when the worker polls right after launching the forward and done at the poll
    after the step; ``fence`` runs the named jobs' copies at once."""

    def __init__(self, layout: KVLayout, kv_caches: dict[str, torch.Tensor], pool: HostPool,
                 lag: bool = False):
        super().__init__(layout, kv_caches, pool)
        self._done: list[CopyResult] = []
        self.lag = lag
        self._queued: dict[int, Callable[[], None]] = {}
        """``lag``: job id -> its copy, not yet run."""

    def store(self, job_id: int, gpu_block_ids: list[int], host_slots: list[int]) -> None:
        self._copy(job_id, lambda: self._store(job_id, gpu_block_ids, host_slots))

    def load(self, job_id: int, gpu_block_ids: list[int], host_slots: list[int]) -> None:
        self._copy(job_id, lambda: self._load(job_id, gpu_block_ids, host_slots))

    def _copy(self, job_id: int, copy: Callable[[], None]) -> None:
        """Run ``copy`` now, or with ``lag`` at the next poll (or fence)."""
        if self.lag:
            self._queued[job_id] = copy
        else:
            copy()

    def _store(self, job_id: int, gpu_block_ids: list[int], host_slots: list[int]) -> None:
        start = time.perf_counter()
        self.pool.ensure_pinned(host_slots)  # (a pinned pool whose layout CUDA's engine lacks)
        ids = torch.tensor(gpu_block_ids, dtype=torch.long, device=self.kv_caches[0].device)
        slots = torch.tensor(host_slots, dtype=torch.long)
        for layer, kv in zip(self.layout.layers, self.kv_caches, strict=True):
            blocks = layer.blocks_view(kv).index_select(0, ids)
            rows = blocks.contiguous().view(torch.uint8).reshape(len(host_slots), layer.nbytes)
            self.pool.buffer[slots, layer.offset:layer.offset + layer.nbytes] = rows.cpu()
        self._finish(job_id, False, len(host_slots), start)

    def _load(self, job_id: int, gpu_block_ids: list[int], host_slots: list[int]) -> None:
        start = time.perf_counter()
        self.pool.ensure_pinned(host_slots)
        ids = torch.tensor(gpu_block_ids, dtype=torch.long, device=self.kv_caches[0].device)
        slots = torch.tensor(host_slots, dtype=torch.long)
        for layer, kv in zip(self.layout.layers, self.kv_caches, strict=True):
            rows = self.pool.buffer[slots, layer.offset:layer.offset + layer.nbytes]
            view = layer.blocks_view(kv)
            blocks = rows.to(kv.device).view(kv.dtype).reshape(len(host_slots), *view.shape[1:])
            view.index_copy_(0, ids, blocks)
        self._finish(job_id, True, len(host_slots), start)

    def poll(self) -> list[CopyResult]:
        done, self._done = self._done, []
        queued, self._queued = self._queued, {}
        for run in queued.values():  # (lag: returned by the next poll)
            run()
        return done

    def fence(self, job_ids: set[int]) -> None:
        for job_id in job_ids & self._queued.keys():  # (without lag every job finished already)
            self._queued.pop(job_id)()

    def _finish(self, job_id: int, is_load: bool, num_blocks: int, start: float) -> None:
        nbytes = num_blocks * sum(layer.nbytes for layer in self.layout.layers)
        self._done.append(CopyResult(job_id, True, nbytes, time.perf_counter() - start,
                                     is_load=is_load))
