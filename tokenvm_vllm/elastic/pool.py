"""``ElasticPool``: the scheduler side of elastic GPU KV memory, driving vLLM's real ``BlockPool``.

vLLM allocates its whole KV cache at start-up and its ``BlockPool`` hands out any block id below
``num_gpu_blocks``. Elastic mode makes only the blocks whose page groups are *mapped* usable
(``page_groups.PageGroupPool``); every other block is *parked*: taken out of vLLM's free queue
and given ``ref_cnt = 1``, exactly as vLLM keeps its own null block out of circulation, so vLLM
never hands it out, never evicts into it and never counts it as free.

- Start: the floor's page groups (and the null block's) are mapped, every other block parked.
- Grow (``grow``): when the free usable blocks fall short of the coming demand plus a margin,
  map more groups (lowest first, never past the ceiling) and give their blocks back to vLLM with
  ``BlockPool.free_blocks``, which puts blocks without a hash at the *front* of the free queue:
  the newly usable blocks are handed out first.
- Shrink (``maybe_shrink``): after ``idle_s`` at low use (``ShrinkPolicy``), pick whole groups
  with no block in use. Their prefix-cached blocks must first be READABLE in TokenVM's host (or
  disk) tier: the ones that are not are handed to ``request_store`` (the scheduler's store path)
  and the shrink waits for a later step. Once every one is readable: ``evict_blocks`` drops them
  from vLLM's prefix cache, the group's blocks are parked, then the groups are unmapped. While
  requests are still being served (``serving``) there is no low-use shrink at all: the cached
  prefixes are what the next requests hit.

Safety contract (why the call sites in ``connector/scheduler.py`` are where they are): a shrink
parks blocks, so it must never run while vLLM holds a reference to a free block it is about to
``touch`` (between ``get_computed_blocks`` and ``allocate_slots`` inside ``schedule``): it runs
only between steps (``on_new_request``) and at the end of ``schedule`` (``build_connector_meta``).
Growing only adds free blocks and is safe anywhere.

Mapping goes through the ``Mapper`` interface. In the engine it is ``protocol.CommandMapper``:
the scheduler only records map/unmap commands, which every worker applies to its KV tensors
(VMM ranges on CUDA, a recorded set on CPU, where the block pool's behaviour is real and the
memory footprint is not); see ``protocol.py`` for when workers map and unmap. ``NullMapper``
maps nothing (unit tests).

vLLM side effects to know: parked blocks count as *used* in vLLM's ``kv_cache_usage`` metric,
and vLLM's ``reset_prefix_cache`` refuses while any block is parked (it wants every block free).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tokenvm_vllm import compat
from tokenvm_vllm.compat import NULL_BLOCK_ID
from tokenvm_vllm.elastic.page_groups import (
    PAGE_BYTES,
    BlockState,
    GrowPlan,
    MapDeferred,
    Mapper,
    PageGroupLayout,
    PageGroupPool,
    ShrinkPolicy,
)
from tokenvm_vllm.elastic.protocol import initial_groups

logger = logging.getLogger("vllm.tokenvm")

MAX_SPILL_ATTEMPTS = 100
"""Steps a shrink waits for its blocks to become READABLE in host before it gives up (for an
idle period): stores normally finish in a step or two."""


class NullMapper:
    """The CPU mapper: maps nothing. CPU has no VMM for vLLM's KV tensors; with this mapper only
    vLLM's view of which blocks exist changes (the tensors stay fully allocated)."""

    def map_group(self, group: int) -> None:
        return

    def unmap_group(self, group: int) -> None:
        return


@dataclass
class ElasticCounters:
    """Running totals since the last ``take_counters`` (exported as ``tokenvm:elastic_*``)."""

    grown_groups: int = 0
    shrunk_groups: int = 0
    unparked_blocks: int = 0
    parked_blocks: int = 0
    spilled_blocks: int = 0
    spill_store_blocks: int = 0
    spill_dropped_blocks: int = 0
    failed_maps: int = 0
    reserve_waits: int = 0


def check_platform(elastic: bool) -> None:
    """Refuse elastic mode where its hooks are not written: on CUDA, a vLLM release other than
    the one whose KV allocation ``compat.install_elastic_kv_hook`` wraps, or a GPU platform that
    is not CUDA. The GPU check ``ci/gpu/elastic_exact.py`` passed token-exact on vLLM 0.26's V2
    and V1 runners, eager (H200, 2026-11-30) and with CUDA graphs (``--configs elastic_graphs``,
    the same day, across a shrink and a regrow; a replayed graph reading a block on an unmapped
    group was the worry). CPU (no VMM: only the set of usable blocks changes) is accepted. Raises
    ``TokenVMConfigError``."""
    if not elastic:
        return
    from vllm.platforms import current_platform

    if current_platform.is_cuda_alike():
        from tokenvm_vllm.config import TokenVMConfigError

        version = compat.vllm_version()
        if not current_platform.is_cuda():
            raise TokenVMConfigError(
                "tokenvm: elastic=true needs NVIDIA CUDA's virtual memory API; this GPU "
                "platform is not CUDA; unset elastic")
        if version not in compat.ELASTIC_CUDA_VLLM:
            raise TokenVMConfigError(
                f"tokenvm: elastic=true on GPU needs vLLM "
                f"{' or '.join(compat.ELASTIC_CUDA_VLLM)} (its KV allocation is hooked there), "
                f"this is vLLM {version}; unset elastic")


def layout_for(kv_cache_config: Any, page_bytes: int = PAGE_BYTES) -> PageGroupLayout:
    """The page-group geometry of vLLM's KV cache: one region per block-major range vLLM
    allocates (``compat.kv_cache_block_regions``); where the config lists no tensors
    (scheduler-only harnesses), one region per layer of each group's per-layer block bytes."""
    regions = compat.kv_cache_block_regions(kv_cache_config)
    if not regions:
        from tokenvm_vllm.transfer.layout import kv_cache_groups

        regions = [g.block_bytes // len(g.layer_names)
                   for g in kv_cache_groups(kv_cache_config) for _ in g.layer_names]
    return PageGroupLayout(regions, kv_cache_config.num_blocks, page_bytes)


class ElasticPool:
    """Owns a ``PageGroupPool`` and a ``ShrinkPolicy`` and applies them to vLLM's ``BlockPool``.

    ``block_pool`` must be fresh (every block but the null block free, nothing cached): the
    constructor parks what the floor does not cover. ``is_spilled(key)`` says whether a block
    key is READABLE in TokenVM's tiers; ``request_store(pairs)`` asks the scheduler to store
    ``(key, block_id)`` pairs to host in its next store job. ``reserve_blocks`` is always kept
    free on top of the demand (vLLM's watermark, a decode step's growth).
    """

    def __init__(
        self, block_pool: Any, layout: PageGroupLayout, mapper: Mapper, *,
        floor_bytes: int, ceiling_bytes: int | None, idle_s: float,
        is_spilled: Callable[[Any], bool],
        request_store: Callable[[list[tuple[Any, int]]], None],
        reserve_blocks: int = 0, low_use_fraction: float = 0.25,
        spill_capacity: Callable[[], int] | None = None, keep_cache: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if layout.num_blocks != block_pool.num_gpu_blocks:
            raise ValueError(f"ElasticPool: layout has {layout.num_blocks} blocks, vLLM's block "
                             f"pool {block_pool.num_gpu_blocks}; build the layout from its config")
        self.block_pool = block_pool
        self.layout = layout
        self.groups = PageGroupPool(layout, mapper, floor_bytes, ceiling_bytes)
        self.policy = ShrinkPolicy(idle_s, low_use_fraction)
        self.is_spilled = is_spilled
        self.request_store = request_store
        self.spill_capacity = spill_capacity
        self.reserve_blocks = reserve_blocks
        self.keep_cache = keep_cache
        self.clock = clock
        self.counters = ElasticCounters()
        self.parked: set[int] = set()
        self._pending_spill: set[int] = set()
        """Blocks whose store to host was requested for a shrink and has not been seen done."""
        self._spill_dropped: set[int] = set()
        """Cached blocks of the shrink in progress left unstored: more than the tiers below
        hold (``spill_capacity``); vLLM drops them with the groups."""
        self._spill_attempts = 0
        self._idle_shrink_tried = False
        """An idle-period shrink was tried since the last busy step (see ``awaiting_idle_
        shrink``)."""
        self._start()
        self._start_bytes = self.mapped_bytes

    # -- state -----------------------------------------------------------------------------

    @property
    def usable_blocks(self) -> int:
        """Blocks vLLM may use now (null block included)."""
        return self.layout.num_blocks - len(self.parked)

    @property
    def mapped_bytes(self) -> int:
        return self.groups.mapped_bytes

    @property
    def shrink_pending(self) -> bool:
        """A shrink waits for stores to host: the engine must keep stepping to finish it."""
        return bool(self._pending_spill)

    @property
    def awaiting_idle_shrink(self) -> bool:
        """More than the start set is mapped and the idle period since the last busy step has
        not yet ended in a shrink attempt: the engine should keep stepping (empty steps) so the
        shrink happens on time even when no request arrives (an idle vLLM engine does not
        step). False once the attempt was made, whatever its outcome, until the next busy
        step."""
        return not self._idle_shrink_tried and self.mapped_bytes > self._start_bytes

    def take_counters(self) -> ElasticCounters:
        counters, self.counters = self.counters, ElasticCounters()
        return counters

    def _state_of(self, block_id: int) -> BlockState:
        block = self.block_pool.blocks[block_id]
        if block.ref_cnt > 0 or block.is_null:
            return BlockState.IN_USE
        return BlockState.FREE if block.block_hash is None else BlockState.CACHED

    # -- start -----------------------------------------------------------------------------

    def _start(self) -> None:
        free = self.block_pool.get_num_free_blocks()
        if free != self.layout.num_blocks - 1:
            raise RuntimeError(f"ElasticPool: vLLM's block pool has {free} free blocks of "
                               f"{self.layout.num_blocks}; elastic mode must start on a fresh "
                               "pool")
        # The floor, and the null block's groups (never freed, written by padded slots): the
        # same set every worker maps at allocation (protocol.initial_groups).
        start = initial_groups(self.layout, self.groups.floor_bytes, self.groups.ceiling_bytes)
        self.groups.apply_grow(GrowPlan(start, (), 0, 0))
        mapped = frozenset(self.groups.mapped)
        to_park = [b for b in range(self.layout.num_blocks)
                   if b != NULL_BLOCK_ID and not self.layout.is_usable(b, mapped)]
        self._park(to_park)
        self.counters = ElasticCounters()  # start-up parking is not a shrink
        logger.info("TokenVM elastic: %d of %d KV blocks usable at start (%d of %d bytes "
                    "mapped, ceiling %d, %d page groups of up to %d bytes: one %d-byte page in "
                    "each of %d regions of %s bytes per block)", self.usable_blocks,
                    self.layout.num_blocks, self.mapped_bytes, self.groups.total_bytes,
                    self.groups.ceiling_bytes, self.layout.num_groups,
                    self.layout.group_bytes(0), self.layout.page_bytes,
                    len(self.layout.block_bytes), sorted(set(self.layout.block_bytes)))

    def _forget_spill(self) -> None:
        """The shrink in progress ended (done or given up): no store is awaited, no block is
        marked to drop."""
        self._pending_spill.clear()
        self._spill_dropped.clear()

    def _cap_spill(self, missing: list[tuple[Any, int]], already: int) -> list[tuple[Any, int]]:
        """Of the shrink's cached blocks not yet in host (``missing``; ``already`` more are),
        the ones to store: all, unless together they are more than the tiers below hold
        (``spill_capacity``). Then storing them all would evict this shrink's own earlier
        stores and never finish, churning the host tier empty of what it held (seen on the
        H200: a 28 GiB spill into a 20 GiB host tier); so only the most recently used fit, and
        the coldest are left for vLLM to drop with their groups (``spill_dropped_blocks``)."""
        if self.spill_capacity is None or not missing:
            return missing
        budget = max(0, self.spill_capacity() - already)
        if len(missing) <= budget:
            return missing
        queued = {b for _, b in missing}
        # vLLM's free queue runs from the next block it evicts (coldest) to the hottest.
        order = {block.block_id: i for i, block in enumerate(compat.iter_free_blocks(
            self.block_pool, self.block_pool.get_num_free_blocks())) if block.block_id in queued}
        ranked = sorted(missing, key=lambda kb: order.get(kb[1], -1), reverse=True)
        self._spill_dropped.update(b for _, b in ranked[budget:])
        logger.info("TokenVM elastic: a shrink's %d cached blocks are more than the tiers below "
                    "hold; keeping the %d most recently used, dropping %d",
                    len(missing) + already, budget + already, len(missing) - budget)
        return ranked[:budget]

    def _park(self, block_ids: Sequence[int]) -> None:
        """Take free, uncached blocks out of vLLM's circulation (as vLLM does its null block)."""
        queue = self.block_pool.free_block_queue
        for block_id in block_ids:
            block = self.block_pool.blocks[block_id]
            assert block.ref_cnt == 0 and block.block_hash is None and not block.is_null, (
                f"tokenvm elastic: parking block {block_id} in use or cached (a bug)")
            queue.remove(block)
            block.ref_cnt = 1
            self.parked.add(block_id)
        self.counters.parked_blocks += len(block_ids)

    def _unpark_usable(self, groups: Iterable[int]) -> int:
        """Give every parked block that the newly mapped ``groups`` made usable back to vLLM, at
        the front of its free queue (``free_blocks`` prepends blocks without a hash: handed out
        first). Only those groups' blocks are looked at: a parked block is one whose groups are
        not all mapped, so it becomes usable only when one of its groups is mapped. (Scanning
        every parked block instead cost ~1.3 ms a growth step on a 2-core VM with 3,072
        blocks, ``bench/elastic_step_cost``: the first seconds of every burst.)"""
        mapped = self.groups.mapped
        ready = sorted({b for g in groups for b in self.layout.blocks_of_group(g)
                        if b in self.parked and self.layout.is_usable(b, mapped)})
        if not ready:
            return 0
        blocks = [self.block_pool.blocks[b] for b in ready]
        self.parked.difference_update(ready)
        self.block_pool.free_blocks(blocks)  # ref_cnt 1 -> 0, prepended to the free queue
        self.counters.unparked_blocks += len(ready)
        return len(ready)

    # -- grow ------------------------------------------------------------------------------

    def grow(self, demand: int) -> int:
        """Make ``demand`` blocks (plus ``reserve_blocks``) free for vLLM if the ceiling allows;
        returns how many blocks became usable. A map the mapper defers (``MapDeferred``: the
        workers' reserve is used up) is counted, a failed one (out of device memory) logged and
        counted; the groups mapped before it are used."""
        plan = self.groups.plan_grow(self._free_for_growth(), max(0, demand),
                                     self.reserve_blocks)
        if not plan.groups:
            return 0
        before = len(self.groups.mapped)
        try:
            self.groups.apply_grow(plan)
        except MapDeferred:  # the workers' reserve is used up: more once they report a refill
            self.counters.reserve_waits += 1
        except MemoryError as err:
            self.counters.failed_maps += 1
            logger.warning("TokenVM elastic: mapping a page group failed (%s); serving with %d "
                           "usable blocks", err, self.usable_blocks)
        self.counters.grown_groups += len(self.groups.mapped) - before
        # (the plan's groups were all unmapped: those mapped now are the ones this call mapped)
        return self._unpark_usable(g for g in plan.groups if g in self.groups.mapped)

    def _free_for_growth(self) -> int:
        """The free blocks a grow counts as available. vLLM's free count includes cached blocks
        no request holds (it evicts them to allocate); with ``keep_cache`` those do not count,
        so the pool grows (within the ceiling) instead of vLLM evicting its prefix cache. The
        cached free blocks are estimated in O(1) as vLLM's cached hashes less the blocks in
        use (a hash held by several blocks counts once: the estimate errs toward growing
        less)."""
        if not self.keep_cache:
            return int(self.block_pool.get_num_free_blocks())
        return compat.uncached_free_blocks(self.block_pool, self.usable_blocks)

    def set_ceiling(self, ceiling_bytes: int) -> None:
        """A new ceiling while running: growth stops there, and the next ``maybe_shrink``
        shrinks to it without waiting for an idle period. Below the floor: the floor."""
        self.groups.set_ceiling(max(ceiling_bytes, self.groups.floor_bytes))

    # -- shrink ----------------------------------------------------------------------------

    def observe(self, now: float | None = None) -> None:
        """Record this step's use for the shrink policy (blocks in use among the usable)."""
        now = self.clock() if now is None else now
        usable = self.usable_blocks
        in_use = usable - self.block_pool.get_num_free_blocks()
        if self.policy.observe(now, in_use, usable):
            self._idle_shrink_tried = False

    def maybe_shrink(self, now: float | None = None, serving: bool = False) -> int:
        """Shrink to the floor if the pool has been at low use for ``idle_s``; returns the
        groups unmapped (0 when not, nothing qualifies, or cached blocks still wait for their
        store to host: then the store is requested and a later call finishes the shrink).

        ``serving``: requests are still in the engine (one within ``idle_s``). Then there is no
        low-use shrink: the cached prefixes are what the next requests hit. On the H200 a
        long-context run at 1 request/s used a quarter of its blocks or fewer for 10 s while
        serving; shrinking to the floor then spilled 28 GiB of documents into a 20 GiB host
        tier (1.4x the prompt tokens recomputed), and a later rule that unmapped only groups
        whose cached blocks were in host already still dropped 17.6 GiB of them from the GPU
        (2.1x recomputed, TTFT p50 10x: the host tier evicted them before their revisits). A
        lowered ceiling (or ``gpu_free_target_bytes``) shrinks either way, and a shrink that
        began while not serving finishes (its stores are under way).

        Call only between steps or at the end of ``schedule`` (see the module docstring)."""
        now = self.clock() if now is None else now
        over_ceiling = self.mapped_bytes > self.groups.ceiling_bytes
        low_use = self.policy.should_shrink(now)
        if not over_ceiling and not low_use:
            return 0
        idle = low_use and not serving  # the idle-period shrink, the one the engine waits out
        if serving and not over_ceiling and not self._pending_spill:
            return 0  # (a shrink begun idle goes on: its stores are under way)
        target = None
        if over_ceiling:  # whole groups only: round the ceiling down to a group boundary
            group = self.layout.group_bytes(0)
            target = self.groups.ceiling_bytes // group * group
        plan = self.groups.plan_shrink(self._state_of, target_bytes=target)
        if not plan.groups and over_ceiling:
            return 0  # the groups above the ceiling are in use: try again next step
        if not plan.groups:
            # At the floor, or every group above it has a block in use: try again after another
            # idle period rather than scan every mapped block on every step.
            self._forget_spill()
            self.policy.shrank(now)
            self._idle_shrink_tried = self._idle_shrink_tried or idle
            return 0
        unstored = [(self.block_pool.blocks[b].block_hash, b) for b in plan.spill
                    if not self.is_spilled(self.block_pool.blocks[b].block_hash)]
        missing = self._cap_spill([kb for kb in unstored if kb[1] not in self._spill_dropped],
                                  already=len(plan.spill) - len(unstored))
        if missing:
            self._spill_attempts += 1
            if self._spill_attempts > MAX_SPILL_ATTEMPTS:
                # The host tier cannot take them (every slot pinned, stores failing): keep the
                # groups rather than drop blocks unsaved, and stop keeping the engine stepping.
                logger.warning("TokenVM elastic: %d cached blocks could not be stored to host "
                               "in %d steps; shrink postponed by %.1fs", len(missing),
                               MAX_SPILL_ATTEMPTS, self.policy.idle_s)
                self._forget_spill()
                self._spill_attempts = 0
                self.policy.shrank(now)
                self._idle_shrink_tried = self._idle_shrink_tried or idle
                return 0
            # A store asked for earlier is in flight (the key is WRITING: the planner skips it)
            # or failed (the key left the host tier): asking again covers both.
            self.request_store(missing)
            self.counters.spill_store_blocks += sum(
                1 for _, b in missing if b not in self._pending_spill)
            self._pending_spill.update(b for _, b in missing)
            return 0  # blocks must be READABLE in host before vLLM drops them
        self.counters.spill_dropped_blocks += sum(1 for b in plan.spill if b in self._spill_dropped)
        self._forget_spill()
        self._spill_attempts = 0
        if plan.spill:
            self.block_pool.evict_blocks(set(plan.spill))
        self._park(plan.unusable)
        self.groups.apply_shrink(plan)
        self.counters.shrunk_groups += len(plan.groups)
        self.counters.spilled_blocks += len(plan.spill)
        self.policy.shrank(now)
        self._idle_shrink_tried = self._idle_shrink_tried or idle
        logger.info("TokenVM elastic: %s, shrank by %d page groups (%d bytes); %d cached blocks "
                    "were in host first, %d blocks usable now",
                    f"ceiling {self.groups.ceiling_bytes} bytes" if over_ceiling
                    else f"idle {self.policy.idle_s:.1f}s", len(plan.groups), plan.bytes,
                    len(plan.spill), self.usable_blocks)
        return len(plan.groups)
