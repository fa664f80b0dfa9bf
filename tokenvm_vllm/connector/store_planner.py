"""``StorePlanner``: which blocks leave the GPU each step, and which go down to disk and Redis.

Scheduler side (no tensors). Each step ``TokenVMScheduler.build_connector_meta`` asks it for:

- the step's store job (GPU -> host): ``write_through`` (default), every block this step's
  forward fills that host memory lacks; ``write_back``, the cached blocks nearest the eviction
  end of vLLM's GPU free queue that host memory lacks (a free block may be handed out again
  while its copy runs: the fence on re-allocation covers that);
- the demotions of newly READABLE host blocks to disk and to the remote tier, each within its
  in-flight limit.

Every block it plans is reserved through the ``TierManager`` (``prepare_*``) and given a job id
by the ``JobTable``; completions come back through the scheduler (``complete_*``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tokenvm_vllm import compat
from tokenvm_vllm.config import TokenVMConfig, WriteMode
from tokenvm_vllm.connector.jobs import JobKind, JobTable
from tokenvm_vllm.connector.metadata import CopyJob, DiskJob, RemoteBatch
from tokenvm_vllm.connector.requests import RequestState
from tokenvm_vllm.keys import BlockKey, key_group, with_group
from tokenvm_vllm.tiers.manager import TierManager
from tokenvm_vllm.tiers.residency import Tier
from tokenvm_vllm.transfer.layout import GroupInfo

if TYPE_CHECKING:
    from collections.abc import Callable

    from vllm.v1.core.sched.output import SchedulerOutput

Planned = list[tuple[BlockKey, int, int]]
"""(key, GPU block, host slot) per block to store."""


class StorePlanner:
    def __init__(
        self, config: TokenVMConfig, tiers: TierManager, jobs: JobTable, block_size: int,
        write_back_lookahead: int, groups: tuple[GroupInfo, ...] = (),
    ) -> None:
        self.config = config
        self.tiers = tiers
        self.jobs = jobs
        self.block_size = block_size
        self.write_back_lookahead = write_back_lookahead
        self.groups = groups or (GroupInfo(0, (), 0, None),)
        """vLLM's KV cache groups (hybrid models: several; each block is stored per group)."""
        self.gpu_block_pool: Any = None
        """vLLM's GPU ``BlockPool`` (``bind_gpu_block_pool``); write-back walks its free queue."""
        self.spill: list[tuple[BlockKey, int]] = []
        """(key, GPU block) pairs an elastic shrink needs in host before it drops them from
        vLLM's cache (``elastic/pool.py``): stored by the next ``plan_store``, whatever the
        write mode, then cleared (the shrink asks again until they are READABLE)."""

    def plan_store(
        self, scheduler_output: SchedulerOutput, requests: Mapping[str, RequestState],
        block_keys: Callable[[RequestState, int, int], list[BlockKey]],
        hashed_blocks: Callable[[Any], int],
    ) -> CopyJob | None:
        """Reserve host slots for the blocks to copy out this step, as one job."""
        if self.config.write_mode is WriteMode.WRITE_BACK:
            planned = self._write_back()
        else:
            planned = self._write_through(scheduler_output, requests, block_keys, hashed_blocks)
        planned += self._spill()
        if not planned:
            return None
        keys = [key for key, _, _ in planned]
        gpu_block_ids = [gpu_block for _, gpu_block, _ in planned]
        job = self.jobs.add(JobKind.STORE, keys, gpu_block_ids)
        groups = [key_group(key) for key in keys] if len(self.groups) > 1 else None
        return CopyJob(job, gpu_block_ids, [slot for _, _, slot in planned], groups=groups)

    def _write_back(self) -> Planned:
        planned: Planned = []
        if self.gpu_block_pool is None:
            return planned
        for block in compat.iter_free_blocks(self.gpu_block_pool, self.write_back_lookahead):
            key = block.block_hash  # vLLM's hash + 4-byte group id: the BlockKey format
            # (a sliding-window block freed once out of the window is cached like any other)
            if key is None or block.is_null or self.tiers.contains(key):
                continue  # in host, or on disk (promoted back on demand)
            slot = self.tiers.prepare_store(key)
            if slot is None:
                break  # every host slot pinned
            planned.append((key, block.block_id, slot))
        return planned

    def _spill(self) -> Planned:
        """The elastic shrink's blocks that no tier holds yet (one in flight is WRITING, so
        ``contains`` skips it). A free cached block re-allocated while its copy runs is fenced
        like a write-back one."""
        planned: Planned = []
        for key, gpu_block in self.spill:
            if self.tiers.contains(key):
                continue
            slot = self.tiers.prepare_store(key)
            if slot is None:
                break  # every host slot pinned: the shrink waits
            planned.append((key, gpu_block, slot))
        self.spill = []
        return planned

    def _write_through(
        self, scheduler_output: SchedulerOutput, requests: Mapping[str, RequestState],
        block_keys: Callable[[RequestState, int, int], list[BlockKey]],
        hashed_blocks: Callable[[Any], int],
    ) -> Planned:
        """A block two requests fill in one step is stored once: the first reservation makes
        it resident (WRITING). Hybrid models: each filled block is stored in every group that
        still holds it (a sliding-window group's blocks below the window are null, or already
        freed and perhaps handed to another request: never read)."""
        planned: Planned = []
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            state = requests.get(req_id)
            if state is None or state.in_step_load is not None:
                continue  # (stored once its in-step load is known good: see RequestState)
            request = state.request
            first = state.next_store_block
            filled = (request.num_computed_tokens + num_scheduled) // self.block_size
            if filled <= first:
                continue  # no block filled this step (most requests of a decode step)
            filled = min(filled, hashed_blocks(request),
                         min((len(ids) for ids in state.block_ids), default=0))
            if filled <= first:
                continue
            keys = block_keys(state, first, filled)
            for group in self.groups:
                ids = state.block_ids[group.index]
                # Blocks vLLM freed (out of the window) before this step: no longer ours.
                kept = group.first_needed_block(request.num_computed_tokens, self.block_size)
                for i, key in enumerate(keys, first):
                    if i < kept or ids[i] == compat.NULL_BLOCK_ID:
                        continue
                    if group.index:  # (``block_keys`` are group 0's keys)
                        key = with_group(key, group.index)
                    if self.tiers.contains(key, Tier.HOST):
                        self.tiers.touch([key])
                        continue
                    slot = self.tiers.prepare_store(key)
                    if slot is not None:
                        planned.append((key, ids[i], slot))
            state.next_store_block = filled
        return planned

    def plan_disk_writes(self) -> list[DiskJob]:
        """Copy newly READABLE host blocks to disk, within the in-flight limit."""
        room = self.config.disk_max_pending_writes - self.jobs.in_flight(JobKind.DISK_WRITE)
        writes = []
        for key, host_slot, disk_slot in self.tiers.prepare_demotions(max(0, room)):
            job = self.jobs.add(JobKind.DISK_WRITE, [key])
            writes.append(DiskJob(job, key, host_slot, disk_slot))
        return writes

    def plan_remote_writes(self) -> list[RemoteBatch]:
        """Copy newly READABLE host blocks to the remote tier, within the in-flight limit, as
        one batch (one job per block: each finishes on its own)."""
        room = (self.config.remote_max_pending_writes
                - self.jobs.in_flight(JobKind.REMOTE_WRITE))
        writes = self.tiers.prepare_remote_writes(max(0, room)) if self.tiers.remote else []
        if not writes:
            return []
        job_ids = [self.jobs.add(JobKind.REMOTE_WRITE, [key]) for key, _ in writes]
        return [RemoteBatch(job_ids, [key for key, _ in writes], [slot for _, slot in writes])]
