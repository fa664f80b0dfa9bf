"""Page-group accounting for elastic GPU KV memory: pure Python, no GPU needed.

vLLM keeps its KV cache as one tensor per layer (per attention layer in the V2 runner, K and V
together) with blocks along the outermost dimension, so block ``b`` of a tensor whose blocks are
``B`` bytes occupies bytes ``[b*B, (b+1)*B)`` of it. Each tensor (a *region* here) lives in its
own virtual range, cut into pages of ``page_bytes`` (2 MiB). A *page group* ``g`` is page ``g``
of every region: it is mapped and unmapped as a unit, because a block id is usable only when every
page under it, in every layer, is mapped (the forward pass writes block ``b`` of all layers).

When regions have different block sizes (say K and V in separate tensors of different widths,
or layers of different widths) group ``g`` covers different block ranges in different regions;
everything below works per region and takes the union, so a block may need non-adjacent groups.

Pieces:

- ``PageGroupLayout``: the geometry (which groups a block needs, which blocks a group touches,
  bytes per group).
- ``Mapper``: what maps and unmaps a group. ``VmmMapper`` does it on the GPU with
  ``vmm.VirtualRange``s; ``RecordingMapper`` is a test double for CPU machines.
- ``PageGroupPool``: the mapped set, floor and ceiling, the map-ahead planner (``plan_grow``) and
  the shrink planner (``plan_shrink``); ``ShrinkPolicy`` decides when an idle period allows one.

Nothing here talks to vLLM; the block states come in through a callable (``BlockState``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tokenvm_vllm.elastic import vmm
from tokenvm_vllm.elastic.vmm import VirtualRange

PAGE_BYTES = 2 << 20  # the CUDA VMM granularity on every current NVIDIA GPU


class BlockState(enum.Enum):
    """What vLLM's block pool says about a block (ref count and prefix-cache hash)."""

    FREE = "free"  # ref count 0, no cached content
    CACHED = "cached"  # ref count 0, holds a prefix-cache entry (evictable, worth spilling)
    IN_USE = "in_use"  # ref count > 0: a running request reads or writes it


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


class PageGroupLayout:
    """Which page groups hold which blocks, for ``num_blocks`` blocks in ``len(block_bytes)``
    block-major regions (one per KV tensor) cut into ``page_bytes`` pages.

    Region ``r`` has ``ceil(num_blocks * block_bytes[r] / page_bytes)`` pages; group ``g`` is page
    ``g`` of every region that has one, so ``group_bytes(g)`` is ``page_bytes`` times the number of
    such regions (non-increasing in ``g``).
    """

    def __init__(self, block_bytes: Sequence[int], num_blocks: int,
                 page_bytes: int = PAGE_BYTES) -> None:
        if not block_bytes:
            raise ValueError("block_bytes=[] must name at least one KV tensor's bytes per block")
        for i, b in enumerate(block_bytes):
            _positive(f"block_bytes[{i}]", b)
        self.block_bytes = tuple(block_bytes)
        self.num_blocks = _positive("num_blocks", num_blocks)
        self.page_bytes = _positive("page_bytes", page_bytes)
        self.region_pages = tuple(-(-num_blocks * b // page_bytes) for b in self.block_bytes)
        self.num_groups = max(self.region_pages)
        # Identical regions (every layer of a model, as a rule) share one computation.
        self._distinct = sorted(set(self.block_bytes))
        # Per group, computed once: the scheduler sums group bytes over the mapped groups
        # several times a step, and counting the regions each time (32-64 of them, for ~100
        # groups) cost ~0.1 ms a sum on the engine's critical path (see ``PageGroupPool``).
        self._group_pages = tuple(sum(1 for p in self.region_pages if g < p)
                                  for g in range(self.num_groups))
        self._group_bytes = tuple(n * page_bytes for n in self._group_pages)
        # The usual case: every region has the same block size and a page holds whole blocks
        # (vLLM's per-layer tensors of one model). Then block b lies in group b // per only,
        # and the block <-> group questions a grow asks of every block it makes usable (~1,300
        # a growth step on the 8B model) need no set arithmetic.
        single = self._distinct[0] if len(self._distinct) == 1 else 0
        self._blocks_per_page = page_bytes // single if single and page_bytes % single == 0 \
            else 0

    def pages_in_group(self, group: int) -> int:
        """How many regions have a page ``group``."""
        self._check_group(group)
        return self._group_pages[group]

    def group_bytes(self, group: int) -> int:
        """Physical bytes that mapping ``group`` takes."""
        self._check_group(group)
        return self._group_bytes[group]

    def bytes_of(self, groups: Iterable[int]) -> int:
        """Physical bytes that mapping ``groups`` takes (each a valid group)."""
        group_bytes = self._group_bytes
        return sum(group_bytes[g] for g in groups)

    @property
    def total_bytes(self) -> int:
        """Physical bytes that mapping every group takes."""
        return sum(self._group_bytes)

    def groups_of_block(self, block: int) -> tuple[int, ...]:
        """The groups that must all be mapped for ``block`` to be usable, ascending."""
        self._check_block(block)
        if self._blocks_per_page:
            return (block // self._blocks_per_page,)
        groups: set[int] = set()
        for b in self._distinct:
            first = block * b // self.page_bytes
            last = ((block + 1) * b - 1) // self.page_bytes
            groups.update(range(first, last + 1))
        return tuple(sorted(groups))

    def blocks_of_group(self, group: int) -> list[int]:
        """The blocks with at least one byte in ``group`` in some region (they all become
        unusable when it is unmapped), ascending."""
        self._check_group(group)
        per = self._blocks_per_page
        if per:
            return list(range(group * per, min((group + 1) * per, self.num_blocks)))
        blocks: set[int] = set()
        start, end = group * self.page_bytes, (group + 1) * self.page_bytes
        for b in self._distinct:
            first = start // b
            last = min(-(-end // b) - 1, self.num_blocks - 1)
            blocks.update(range(first, last + 1))
        return sorted(blocks)

    def is_usable(self, block: int, mapped: set[int] | frozenset[int]) -> bool:
        if self._blocks_per_page:
            self._check_block(block)
            return block // self._blocks_per_page in mapped
        return all(g in mapped for g in self.groups_of_block(block))

    def _check_group(self, group: int) -> None:
        if not 0 <= group < self.num_groups:
            raise IndexError(f"page group {group} outside 0..{self.num_groups - 1}")

    def _check_block(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} outside 0..{self.num_blocks - 1}")


class MapDeferred(MemoryError):
    """A mapper cannot map a group now, but may later (the scheduler's ``CommandMapper`` when the
    workers have no reserved memory left for it): the caller serves with what is mapped."""


class Mapper(Protocol):
    """Backs page groups with physical memory. ``map_group`` either maps every page of the
    group or raises having mapped none (``MemoryError``; ``MapDeferred``: try again later);
    ``unmap_group`` is only called on mapped groups whose pages no queued kernel still
    touches."""

    def map_group(self, group: int) -> None: ...

    def unmap_group(self, group: int) -> None: ...


class WorkerMapper(Mapper, Protocol):
    """A worker's mapper, which also keeps a *reserve*: physical memory for whole groups created
    ahead and left unmapped, so that a map needs no new memory and cannot fail for the lack of
    it (``elastic/protocol.py``: the scheduler maps only what the workers reported reserved).
    ``map_group`` uses reserved memory first; ``unmap_group(g, keep=True)`` puts the group's
    memory into the reserve instead of freeing it."""

    def unmap_group(self, group: int, keep: bool = False) -> None: ...

    def spare_groups(self) -> int:
        """Whole groups' worth of reserved memory (counted in full groups, the largest)."""
        ...

    def refill(self, groups: int) -> int:
        """Create memory until ``groups`` groups are reserved or the device has no more;
        returns the groups reserved."""
        ...

    def trim(self, groups: int) -> None:
        """Free reserved memory beyond ``groups`` groups."""
        ...


class RecordingMapper:
    """Test double for CPU machines, which cannot map GPU memory: keeps the mapped set in a
    Python set and records every call in ``calls`` as ``("map" | "unmap", group)``.

    Mapping a mapped group or unmapping an unmapped one raises ``AssertionError`` (a bug in the
    caller); groups in ``fail_on`` raise ``MemoryError`` on map, as a GPU out of memory would.
    The reserve (``WorkerMapper``) is a count, ``spare``; ``capacity_groups`` plays the
    device's memory: mapped plus reserved groups never exceed it (``refill`` stops there, and
    a map with nothing reserved on a full device raises ``MemoryError``).
    """

    def __init__(self, fail_on: Iterable[int] = (), capacity_groups: int | None = None) -> None:
        self.mapped: set[int] = set()
        self.calls: list[tuple[str, int]] = []
        self.fail_on = set(fail_on)
        self.spare = 0
        self.capacity_groups = capacity_groups

    def map_group(self, group: int) -> None:
        assert group not in self.mapped, f"group {group} mapped twice"
        if group in self.fail_on:
            raise MemoryError(f"simulated out of memory mapping group {group}")
        if self.spare:
            self.spare -= 1
        elif self.capacity_groups is not None and len(self.mapped) >= self.capacity_groups:
            raise MemoryError(f"simulated out of memory mapping group {group} (device full)")
        self.mapped.add(group)
        self.calls.append(("map", group))

    def unmap_group(self, group: int, keep: bool = False) -> None:
        assert group in self.mapped, f"group {group} unmapped while not mapped"
        self.mapped.remove(group)
        self.spare += keep
        self.calls.append(("unmap", group))

    def spare_groups(self) -> int:
        return self.spare

    def refill(self, groups: int) -> int:
        room = (groups if self.capacity_groups is None
                else self.capacity_groups - len(self.mapped))
        self.spare = max(self.spare, min(groups, room))
        return self.spare

    def trim(self, groups: int) -> None:
        self.spare = min(self.spare, groups)


class VmmMapper:
    """The real mapper: region ``r`` of the layout is ``ranges[r]``, a ``vmm.VirtualRange`` of at
    least ``layout.region_pages[r]`` pages of ``layout.page_bytes``; group ``g`` is page ``g`` of
    each range that has it. A failure part-way through a group unmaps the pages it mapped and
    re-raises, so a group is never half mapped. The reserve (``WorkerMapper``) is each range's
    spare handles (``VirtualRange.add_spares``); a map takes one where there is one.

    The caller synchronises the device before ``unmap_group`` (a kernel still reading the page
    would fault).
    """

    def __init__(self, layout: PageGroupLayout, ranges: Sequence[VirtualRange],
                 compiled: Any = None) -> None:
        if len(ranges) != len(layout.block_bytes):
            raise ValueError(f"VmmMapper: {len(ranges)} ranges for {len(layout.block_bytes)} "
                             "regions; pass one VirtualRange per KV tensor")
        for r, (rng, pages) in enumerate(zip(ranges, layout.region_pages, strict=True)):
            if rng.page_bytes != layout.page_bytes or rng.num_pages < pages:
                raise ValueError(
                    f"VmmMapper: range {r} has {rng.num_pages} pages of {rng.page_bytes} bytes, "
                    f"the layout needs {pages} of {layout.page_bytes}")
        self.layout = layout
        self.ranges = list(ranges)
        self.compiled = compiled
        """``vmm_batch.load()``'s library: a group's maps, and a range's refill, in one call
        each (the GIL given back once, not per page); None: one ctypes call per page."""

    @classmethod
    def allocate(cls, layout: PageGroupLayout, device: int = 0,
                 compiled: bool = False) -> VmmMapper:
        """Reserve one range per region (virtual addresses only; nothing is mapped); with
        ``compiled``, use the compiled VMM loop where it can be built (``vmm_batch``)."""
        from tokenvm_vllm.elastic import vmm_batch

        lib = vmm_batch.load() if compiled else None
        ranges: list[VirtualRange] = []
        try:
            for pages in layout.region_pages:
                ranges.append(VirtualRange(pages * layout.page_bytes, device, layout.page_bytes))
        except BaseException:
            for rng in ranges:
                rng.release()
            raise
        return cls(layout, ranges, lib)

    def _ranges_of(self, group: int) -> list[VirtualRange]:
        """The ranges that have page ``group`` (a shorter region has fewer pages)."""
        return [rng for rng, pages in zip(self.ranges, self.layout.region_pages, strict=True)
                if group < pages]

    def map_group(self, group: int) -> None:
        here = self._ranges_of(group)
        if self.compiled is not None and all(rng.spare_count for rng in here):
            self._map_group_compiled(group, here)
            return
        done: list[VirtualRange] = []
        try:
            for rng in here:
                rng.map(group)
                done.append(rng)
        except BaseException:
            for rng in done:  # (a page it took from the reserve goes back there)
                rng.unmap(group, keep_handle=True)
            raise

    def _map_group_compiled(self, group: int, here: list[VirtualRange]) -> None:
        """Map ``group`` from the reserve in one call into the compiled loop; on a failure its
        handles go back to the reserve (the loop unmapped what it had mapped)."""
        from tokenvm_vllm.elastic import vmm_batch

        taken: list[tuple[VirtualRange, int, int]] = []
        try:
            for rng in here:
                address, handle = rng.take_spare(group)
                taken.append((rng, address, handle))
            vmm.driver().ensure_context(here[0].device)
            vmm_batch.map_pages(self.compiled, [a for _, a, _ in taken],
                                [h for _, _, h in taken], self.layout.page_bytes,
                                here[0].device)
        except BaseException:
            for rng, _, handle in taken:
                rng.return_spare(handle)
            raise
        for rng, _, handle in taken:
            rng.adopt(group, handle)

    def unmap_group(self, group: int, keep: bool = False) -> None:
        for rng in self._ranges_of(group):
            rng.unmap(group, keep_handle=keep)

    def spare_groups(self) -> int:
        return min(rng.spare_count for rng in self.ranges)

    def refill(self, groups: int) -> int:
        for rng in self.ranges:  # stops at the first range the device cannot fill
            want = groups - rng.spare_count
            if want > 0 and rng.add_spares(want, self.compiled) < want:
                break
        return self.spare_groups()

    def trim(self, groups: int) -> None:
        for rng in self.ranges:
            rng.drop_spares(keep=groups)

    def release(self) -> None:
        """Unmap everything and free every range (the tensors viewing them become invalid)."""
        for rng in self.ranges:
            rng.release()


@dataclass(frozen=True)
class GrowPlan:
    """Groups to map (ascending), the blocks they make usable, the bytes they take, and by how
    many blocks the ceiling leaves the request short (0 when fully served)."""

    groups: tuple[int, ...]
    new_blocks: tuple[int, ...]
    bytes: int
    short_by: int


@dataclass(frozen=True)
class ShrinkPlan:
    """Groups to unmap, with what the caller does first: ``spill`` lists the cached blocks to copy
    to the host tier and drop from the prefix cache, ``unusable`` every mapped block the unmap
    takes away (``spill`` included; the free ones leave vLLM's free list)."""

    groups: tuple[int, ...]
    spill: tuple[int, ...]
    unusable: tuple[int, ...]
    bytes: int


class PageGroupPool:
    """The mapped set of page groups between ``floor_bytes`` and ``ceiling_bytes``.

    Growth maps the lowest unmapped groups first (filling holes a shrink left), so usable blocks
    stay as dense as possible. Invariants the tests check: mapped bytes never exceed the
    ceiling; a shrink never unmaps a group holding an ``IN_USE`` block and never goes below the
    floor; a failed map leaves the mapped set as it was before that group.
    """

    def __init__(self, layout: PageGroupLayout, mapper: Mapper, floor_bytes: int = 0,
                 ceiling_bytes: int | None = None) -> None:
        total = layout.total_bytes
        ceiling = total if ceiling_bytes is None else ceiling_bytes
        if not isinstance(floor_bytes, int) or floor_bytes < 0:
            raise ValueError(f"floor_bytes={floor_bytes!r} must be an integer >= 0")
        if not isinstance(ceiling, int) or ceiling < floor_bytes:
            raise ValueError(f"ceiling_bytes={ceiling_bytes!r} must be an integer >= floor_bytes "
                             f"({floor_bytes}); raise the ceiling or lower the floor")
        self.layout = layout
        self.mapper = mapper
        self.floor_bytes = floor_bytes
        self.ceiling_bytes = min(ceiling, total)
        self.total_bytes = total
        self.mapped: set[int] = set()
        """The mapped groups. Change it only through ``apply_grow`` and ``apply_shrink``: they
        keep ``mapped_bytes`` in step with it."""
        self._mapped_bytes = 0

    # -- state ---------------------------------------------------------------------------------

    @property
    def mapped_bytes(self) -> int:
        """Physical bytes of the mapped groups, kept as they change: it is read several times
        per engine step (summing 96 groups each time was most of the elastic hooks' 55 µs a
        step at the ceiling, ``bench/elastic_step_cost``)."""
        return self._mapped_bytes

    def usable_blocks(self) -> list[int]:
        """Every block whose pages are all mapped, ascending (a full scan: for tests and
        start-up, not the per-step path)."""
        return [b for b in range(self.layout.num_blocks) if self.layout.is_usable(b, self.mapped)]

    def set_ceiling(self, ceiling_bytes: int) -> None:
        """Change the ceiling at run time. Lowering it below the mapped bytes maps nothing more;
        the caller then shrinks with ``plan_shrink(target_bytes=ceiling_bytes)``."""
        if not isinstance(ceiling_bytes, int) or ceiling_bytes < self.floor_bytes:
            raise ValueError(f"ceiling_bytes={ceiling_bytes!r} must be an integer >= floor_bytes "
                             f"({self.floor_bytes}); pick a larger ceiling")
        self.ceiling_bytes = min(ceiling_bytes, self.total_bytes)

    # -- growth --------------------------------------------------------------------------------

    def plan_grow(self, free_blocks: int, demand: int, ahead: int) -> GrowPlan:
        """Groups to map so that ``free_blocks`` (usable blocks vLLM could hand out now) covers
        ``demand`` (blocks the next step allocates) plus ``ahead`` spare, within the ceiling.

        Returns an empty plan when nothing is needed. Never plans beyond ``ceiling_bytes``:
        ``short_by`` says how many blocks are still missing then.
        """
        for name, v in (("free_blocks", free_blocks), ("demand", demand), ("ahead", ahead)):
            if v < 0:
                raise ValueError(f"plan_grow: {name}={v} must be >= 0")
        need = demand + ahead - free_blocks
        if need <= 0:
            return GrowPlan((), (), 0, 0)
        budget = self.ceiling_bytes - self.mapped_bytes
        smallest = self.layout.group_bytes(self.layout.num_groups - 1)  # (bytes never grow with g)
        if len(self.mapped) == self.layout.num_groups or budget < smallest:
            # At the ceiling, where a busy pool asks on every step (wave, H200): no scan.
            return GrowPlan((), (), 0, need)
        chosen: list[int] = []
        new: list[int] = []
        would = set(self.mapped)
        for g in range(self.layout.num_groups):
            if len(new) >= need:
                break
            if g in would:
                continue
            cost = self.layout.group_bytes(g)
            if cost > budget:
                break  # group bytes never grow with g: nothing later fits either
            budget -= cost
            would.add(g)
            chosen.append(g)
            new.extend(b for b in self.layout.blocks_of_group(g)
                       if self.layout.is_usable(b, would)
                       and not self.layout.is_usable(b, self.mapped))
        new_sorted = tuple(sorted(set(new)))
        return GrowPlan(tuple(chosen), new_sorted,
                        sum(self.layout.group_bytes(g) for g in chosen),
                        max(0, need - len(new_sorted)))

    def apply_grow(self, plan: GrowPlan) -> list[int]:
        """Map the plan's groups in order; returns the blocks that became usable. If a map
        fails, the groups mapped before it stay mapped (they are whole) and the error
        propagates; ``mapped`` is exact either way."""
        before = set(self.mapped)
        for g in plan.groups:
            self.mapper.map_group(g)
            self.mapped.add(g)
            self._mapped_bytes += self.layout.group_bytes(g)
        return [b for g in plan.groups for b in self.layout.blocks_of_group(g)
                if self.layout.is_usable(b, self.mapped)
                and not self.layout.is_usable(b, before)]

    def grow(self, free_blocks: int, demand: int, ahead: int) -> GrowPlan:
        """``plan_grow`` then ``apply_grow``; returns the plan."""
        plan = self.plan_grow(free_blocks, demand, ahead)
        self.apply_grow(plan)
        return plan

    def ensure_floor(self) -> list[int]:
        """Map the lowest groups until the floor is reached (at start-up), never past the
        ceiling; returns them."""
        chosen: list[int] = []
        total = self.mapped_bytes
        for g in range(self.layout.num_groups):
            if total >= self.floor_bytes:
                break
            if g not in self.mapped:
                if total + self.layout.group_bytes(g) > self.ceiling_bytes:
                    break
                chosen.append(g)
                total += self.layout.group_bytes(g)
        self.apply_grow(GrowPlan(tuple(chosen), (), 0, 0))
        return chosen

    # -- shrink --------------------------------------------------------------------------------

    def plan_shrink(self, state_of: Callable[[int], BlockState],
                    target_bytes: int | None = None) -> ShrinkPlan:
        """Whole groups to unmap, bringing mapped bytes down towards ``max(target_bytes, floor)``
        (the floor when ``target_bytes`` is None) without going below it.

        A group qualifies only if none of its usable blocks is ``IN_USE``. Among those, groups
        with fewer cached blocks go first (less to spill), then higher groups (growth refills
        from the bottom). The plan may free less than asked when too few groups qualify.
        """
        goal = self.floor_bytes if target_bytes is None else max(target_bytes, self.floor_bytes)
        excess = self.mapped_bytes - goal
        if excess <= 0:
            return ShrinkPlan((), (), (), 0)
        candidates: list[tuple[int, int, list[int], list[int]]] = []
        for g in self.mapped:
            usable = [b for b in self.layout.blocks_of_group(g)
                      if self.layout.is_usable(b, self.mapped)]
            states = [state_of(b) for b in usable]
            if any(s is BlockState.IN_USE for s in states):
                continue
            cached = [b for b, s in zip(usable, states, strict=True) if s is BlockState.CACHED]
            candidates.append((len(cached), -g, cached, usable))
        candidates.sort(key=lambda c: (c[0], c[1]))
        groups: list[int] = []
        spill: set[int] = set()
        unusable: set[int] = set()
        freed = 0
        for _, neg_g, cached, usable in candidates:
            g = -neg_g
            cost = self.layout.group_bytes(g)
            if freed + cost > excess:
                continue  # would cross the floor/target; a smaller (higher) group may still fit
            groups.append(g)
            spill.update(cached)
            unusable.update(usable)
            freed += cost
        return ShrinkPlan(tuple(sorted(groups)), tuple(sorted(spill)), tuple(sorted(unusable)),
                          freed)

    def apply_shrink(self, plan: ShrinkPlan) -> None:
        """Unmap the plan's groups. The caller has already spilled ``plan.spill``, removed
        ``plan.unusable`` from vLLM's pool and synchronised the device."""
        for g in plan.groups:
            if g not in self.mapped:
                raise ValueError(f"apply_shrink: group {g} is not mapped (stale plan); plan again")
        for g in plan.groups:
            self.mapper.unmap_group(g)
            self.mapped.discard(g)
            self._mapped_bytes -= self.layout.group_bytes(g)


class ShrinkPolicy:
    """When to shrink: after ``idle_s`` seconds in which every observed step used at most
    ``low_use_fraction`` of the usable blocks. Any busier step restarts the clock."""

    def __init__(self, idle_s: float, low_use_fraction: float = 0.25) -> None:
        if not idle_s > 0:
            raise ValueError(f"idle_s={idle_s!r} must be > 0 seconds")
        if not 0.0 <= low_use_fraction < 1.0:
            raise ValueError(f"low_use_fraction={low_use_fraction!r} must be in [0, 1)")
        self.idle_s = idle_s
        self.low_use_fraction = low_use_fraction
        self._busy_at: float | None = None

    def observe(self, now: float, in_use_blocks: int, usable_blocks: int) -> bool:
        """Record one step's use; returns whether it was busy (restarting the clock). The
        first observation starts the clock."""
        busy = usable_blocks > 0 and in_use_blocks > self.low_use_fraction * usable_blocks
        if busy or self._busy_at is None:
            self._busy_at = now
        return busy

    def should_shrink(self, now: float) -> bool:
        return self._busy_at is not None and now - self._busy_at >= self.idle_s

    def shrank(self, now: float) -> None:
        """Restart the clock after a shrink, so the next one waits a full idle period."""
        self._busy_at = now
