"""The mapping protocol of elastic GPU KV: the scheduler decides, every worker maps.

The ``ElasticPool`` (scheduler, engine-core process) decides which page groups are mapped; the
KV tensors live in the worker processes (one per tensor-parallel rank). Its mapper here,
``CommandMapper``, maps nothing itself: it records ``("map" | "unmap", group)`` commands, which
the scheduler puts into the step's connector metadata (``TokenVMConnectorMetadata.
elastic_commands``). Every worker applies the same list (``WorkerKV.apply``) in
``bind_connector_metadata``, before the step's forward is launched:

- Ordering of maps: a block becomes usable (unparked) in the scheduler only after its groups'
  map commands were recorded, and the commands recorded up to ``build_connector_meta`` of step N
  travel in step N's metadata. A block is first handed out by a ``schedule`` call, so the step
  that first uses it carries (or follows) the metadata that maps its pages.
- Zeroing: newly mapped pages hold whatever the driver gives (possibly NaN bit patterns, which
  attention would read through masked-out slots); they are zeroed on the current (compute)
  stream before the step's loads are submitted. No CPU wait: by the ``CopyEngine`` contract a
  job first waits on the GPU for the compute stream's work queued before its submission, so a
  load cannot be overwritten by the zeroing, and the forward runs after it on the same stream.
- Ordering of unmaps: a group is unmapped only after the scheduler parked every block on it (no
  request holds them, vLLM cannot hand them out). Kernels of earlier steps, and TokenVM's own
  copies, may still be queued on them: the worker synchronises the device before the first
  unmap of a step (shrinks are rare; the stall does not matter).
- Start: both sides compute the same start set (``initial_groups``: the floor, then the null
  block's groups); the scheduler records no commands for it.
- Warm-up: on CUDA the worker maps *every* group when it allocates the KV tensors, because
  vLLM writes KV before the first metadata: V2's ``warmup_kernels`` runs fake requests on
  blocks 1..N (as many as ``max_num_seqs`` and the token budget need), CUDA graph capture and
  V1's dummy runs write the null block. The first ``apply`` (the first real step; warm-up runs
  with the connector disabled or bypassed) synchronises the device and unmaps everything
  outside the start set. Start-up thus needs the full KV size for a moment, as vLLM without
  elastic mode does; the memory is given back in an empty step right after start-up
  (``SchedulerElastic.warm_up_pending``). Servers sharing a GPU therefore start one after
  another; a warm-up that finds too little free memory stops start-up with one line saying so.

- Reserve (a map never fails mid-step): by the time a worker applies a map, the scheduler has
  handed the group's blocks out, so a map that failed for lack of device memory (another
  process took it) could only end the engine. So a worker maps only memory it created ahead:
  each metadata carries a reserve target (``elastic_reserve``, whole groups; 0 when the engine
  has been idle for ``shrink_idle_s``, never more than the ceiling leaves room for), every
  worker keeps that many groups' physical memory created and unmapped (refilled after the
  step's forward is launched, in ``build_worker_meta``; an unmap keeps its memory while the
  reserve is short) and reports ``(metadata applied, groups reserved)``. The scheduler maps
  only what the reports cover (``ReserveLedger``): a refill that finds the device full just
  reports less, and growth waits (``tokenvm:elastic_reserve_waits``) instead of the worker
  failing.

- Map ahead (``elastic_map_ahead``): a worker also *maps* its reserve, after the step's forward
  was launched (``refill``), at the groups the scheduler will map next: the lowest unmapped ones,
  the order of ``PageGroupPool.plan_grow``. Such a group is *premapped*: its pages are mapped
  and zeroed here, but the scheduler still counts it unmapped and keeps its blocks parked, so no
  step touches it. A later ``("map", g)`` for a premapped group only marks it mapped: the driver
  calls (~2.3 ms per 64 MiB group on an H200) leave the step's critical path. A map for a group
  not premapped takes spare memory as before, or, when all of it is premapped elsewhere,
  unmaps the highest premapped group first (device synchronised). Premapped groups count as
  reserved in the report; a lower target unmaps them (device synchronised), highest first.

- Background (CUDA, with ``map_ahead``): the reserve's driver work, creating memory and mapping
  and zeroing it ahead, runs on a thread of the worker (``background``), not in
  ``build_worker_meta``. In the H200 wave's burst after an idle period each arriving request
  grows the pool by 8-9 groups (~20 ms of driver calls). Mapped in the step (on demand) that
  delayed the request's load; premapped in the step loop it delayed the step in which the load
  finished: lookup to first scheduled, p50 of the burst's first 16 loads (``bench/timeline``'s
  ``first_loads``), 33.7 and 32.4 ms, against 15.3-16.1 ms for a fixed pool; on the thread,
  22.1 ms (2026-12-01, W14-W16).
  The thread works one unit at a time (one group's memory, or one group premapped) and the
  step's own paths never wait for more than one unit: a map command whose group is being
  premapped waits for it; anything else that changes the mapper (an unmap, a map the prediction
  missed, a lower target, warm-up's end) first pauses the thread (``_exclusive``). Premapped
  pages are zeroed on the thread's own CUDA stream; the step's stream waits on that zeroing's
  event when the scheduler maps the group. A report counts only what the thread has finished
  (a group being premapped counts as not reserved: never more than the worker holds), so
  growth may wait a step for memory the thread is still creating. The thread is woken only
  when there is work: it runs Python between driver calls, and each GIL hand-off is time the
  step waits (W16 woke it every step, and its TPOT was 1.049x the fixed pool's in that burst;
  the wake-ups are the likely cause, not measured apart). For the same reason a unit's driver
  calls can go through one call into compiled code (``elastic_compiled_maps``,
  ``vmm_batch``): ~3 ctypes calls per page, 96 for a 64 MiB group, become one.

On CPU (no VMM for vLLM's tensors) the worker keeps the mapped set with a ``RecordingMapper``:
the protocol, and that no step touches a block on an unmapped group or maps a group it has not
reserved, are checked there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from tokenvm_vllm.compat import NULL_BLOCK_ID
from tokenvm_vllm.elastic.page_groups import (
    GrowPlan,
    MapDeferred,
    PageGroupLayout,
    PageGroupPool,
    RecordingMapper,
    VmmMapper,
    WorkerMapper,
)
from tokenvm_vllm.elastic.vmm import CUDA_ERROR_OUT_OF_MEMORY, CudaDriverError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("vllm.tokenvm")

Command = tuple[str, int]
"""``("map", group)`` or ``("unmap", group)``."""

HISTORY_STEPS = 4096
"""Applied metadata whose commands ``WorkerKV.history`` keeps."""


def initial_groups(layout: PageGroupLayout, floor_bytes: int,
                   ceiling_bytes: int | None) -> tuple[int, ...]:
    """The groups mapped at start, in mapping order: the floor's (lowest first, never past the
    ceiling), then any group of the null block not among them (it is written by padded slots and
    read by warm-up runs, so it is always mapped). The scheduler's ``ElasticPool`` and every
    worker call this with the same arguments and so agree without a message."""
    pool = PageGroupPool(layout, RecordingMapper(), floor_bytes, ceiling_bytes)
    chosen = list(pool.ensure_floor())
    missing = tuple(g for g in layout.groups_of_block(NULL_BLOCK_ID) if g not in pool.mapped)
    pool.apply_grow(GrowPlan(missing, (), 0, 0))
    return (*chosen, *missing)


class ReserveLedger:
    """The scheduler's view of the workers' reserves: how many more groups it may map without
    any worker needing new device memory for them.

    Metadata are numbered in the order they are sent (``sent``: the first is 1); a worker
    numbers the metadata it applies the same way and reports ``(applied, reserved)`` after its
    refill. From the latest report every metadata sent since is replayed as the worker applies
    it, assuming no refill succeeds: its maps use reserved groups, then the reserve is trimmed
    to its target. What is left, less the maps recorded for the next metadata, may still be
    mapped (``available``). Until every worker has reported, nothing may."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        """Reports expected per step (vLLM's world size)."""
        self.sent = 0
        self._unreported: deque[tuple[int, int, int]] = deque()
        """(number, maps, reserve target) of each metadata sent since the latest report."""
        self.reported = 0
        """Groups reserved in the latest report (the smallest over the workers)."""
        self._reported_at = -1
        """The metadata number the latest report was made after (-1: none yet)."""

    def sent_batch(self, maps: int, target: int) -> None:
        """A metadata with ``maps`` map commands and reserve ``target`` went out."""
        self.sent += 1
        self._unreported.append((self.sent, maps, target))

    def report(self, entries: Sequence[tuple[int, int]]) -> None:
        """One step's reports, ``(metadata applied, groups reserved)`` from each worker; a step
        with fewer reports than workers is ignored (a later one will do)."""
        if len(entries) < self.workers:
            return
        applied = min(a for a, _ in entries)
        if applied < self._reported_at:
            return  # older than what we know (reports arrive in step order; defensive)
        self._reported_at = applied
        self.reported = min(r for _, r in entries)
        while self._unreported and self._unreported[0][0] <= applied:
            self._unreported.popleft()

    def available(self, pending_maps: int = 0) -> int:
        """Groups that may still be mapped, given ``pending_maps`` recorded for the next
        metadata."""
        if self._reported_at < 0:
            return 0
        left = self.reported
        for _, maps, target in self._unreported:
            left = min(left - maps, target)
        return left - pending_maps


class CommandMapper:
    """The scheduler's ``Mapper``: records what the workers must change instead of mapping.

    Keeps its own mapped set (so a call that makes no sense, mapping a mapped group, fails here,
    in the process that made the mistake) and the set the workers have once they applied every
    batch taken so far. A batch is the difference of the two: unmaps first (they free memory
    for the maps), then maps, each ascending. A group unmapped and mapped again between two
    metadata (an idle shrink at an arrival, then growth for that arrival) is left alone: its
    blocks were evicted, so its stale bytes are never read (vLLM writes a block before it reads
    it), and no zeroing is needed (they are KV a forward wrote, or zeros). A group mapped and
    unmapped between two metadata never reaches the workers: none of its blocks was handed to
    a step (they were parked again before the metadata was built).

    With a ``ledger`` (set once the start set is recorded) a map beyond what the workers
    reported reserved raises ``MapDeferred``: the pool serves with what is mapped and grows
    once the reserve is reported."""

    def __init__(self, start: Sequence[int] = ()) -> None:
        self.mapped: set[int] = set(start)
        self.sent: set[int] = set(start)
        """What the workers have mapped once they applied every batch taken."""
        self.maps = 0
        self.unmaps = 0
        self.ledger: ReserveLedger | None = None

    def map_group(self, group: int) -> None:
        assert group not in self.mapped, f"tokenvm elastic: group {group} mapped twice (a bug)"
        if (self.ledger is not None and group not in self.sent
                and self.ledger.available(len(self.mapped - self.sent)) <= 0):
            raise MapDeferred(f"group {group}: the workers have no reserved memory left for it")
        self.mapped.add(group)
        self.maps += 1

    def unmap_group(self, group: int) -> None:
        assert group in self.mapped, f"tokenvm elastic: group {group} unmapped twice (a bug)"
        self.mapped.remove(group)
        self.unmaps += 1

    @property
    def pending(self) -> list[Command]:
        """The batch the next ``take`` returns."""
        return ([("unmap", g) for g in sorted(self.sent - self.mapped)]
                + [("map", g) for g in sorted(self.mapped - self.sent)])

    def take(self) -> list[Command]:
        """The batch for the step's metadata (see the class docstring)."""
        commands = self.pending
        self.sent = set(self.mapped)
        return commands


class WorkerKV:
    """A worker's side of elastic GPU KV: the layout, the mapper of its KV tensors, and the
    application of the scheduler's commands.

    ``mapper`` is a ``VmmMapper`` over the ranges that back vLLM's KV tensors (CUDA: built by
    ``allocate``) or a ``RecordingMapper`` (CPU, or CUDA before ``allocate``; there a command
    that maps without reserved memory fails, and ``capacity_groups`` plays the device's
    memory).
    ``history`` keeps, per applied metadata, the commands it carried, for the last
    ``HISTORY_STEPS`` (tests compare ranks; unbounded, it grew by one list a step, ~150 a
    second on a busy server)."""

    def __init__(self, layout: PageGroupLayout, start: Sequence[int], cuda: bool = False,
                 capacity_groups: int | None = None, map_ahead: bool = False,
                 background: bool | None = None, compiled_maps: bool = False) -> None:
        self.layout = layout
        self.compiled_maps = compiled_maps
        """Map with the compiled VMM loop where it builds (``vmm_batch``; CUDA only)."""
        self._background = background
        self.map_ahead = map_ahead
        """Map the reserve at the groups the scheduler maps next (module docstring)."""
        self.premapped: set[int] = set()
        """Groups mapped here ahead of the scheduler's command (``map_ahead``); not in
        ``mapped``, which is what the scheduler has mapped."""
        self.premap_hits = 0
        """Map commands that found their group premapped (no driver call on the step)."""
        self.apply_seconds: list[float] = []
        """Time ``apply`` took, per metadata, since the last ``take_apply_seconds``: what the
        step's critical path paid for the commands."""
        self.start = tuple(start)
        self.cuda = cuda
        """On CUDA nothing is mapped until ``allocate`` (the allocation hook) runs."""
        self.mapper: WorkerMapper = RecordingMapper(capacity_groups=capacity_groups)
        self.mapped: set[int] = set()
        self.maps = 0
        self.unmaps = 0
        self.applied = 0
        """Metadata applied (``ReserveLedger`` numbers them the same way)."""
        self.reserve_target = 0
        """Groups to keep reserved, from the latest metadata."""
        self._refill_failed_at: int | None = None
        """The reserve found the device full (logged once until a refill succeeds)."""
        self.history: deque[list[Command]] = deque(maxlen=HISTORY_STEPS)
        self._ranges: list[Any] = []
        self._device: torch.device | None = None
        self.warming_up = False
        """Every group is mapped for vLLM's warm-up; the first ``apply`` trims to the start."""
        # The background thread's state, all guarded by ``_cond``:
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False
        """The thread is in a unit of work (driver calls, outside the lock)."""
        self._inflight: int | None = None
        """The group the thread is premapping."""
        self._paused = 0
        """``_exclusive`` sections open: the thread starts no unit."""
        self._wanted = False
        """``refill`` asked for work the thread has not yet found done."""
        self._stopping = False
        self._create_failed = False
        """The device had no memory at the last attempt: no more until the next ``refill``."""
        self._zeroed: dict[int, Any] = {}
        """Premapped group -> the CUDA event after its zeroing on the thread's stream."""
        self._stream: Any = None
        self.wakeups = 0
        """Times ``refill`` woke the thread (only when there was work)."""
        self.thread_error: BaseException | None = None
        """What ended the thread (then ``refill`` does the work inline, as without it)."""
        if not cuda:  # CPU: nothing to allocate, the start set is mapped at once
            self._map_all(self.start)

    @property
    def background(self) -> bool:
        """Do the reserve's driver work on a thread (module docstring, "Background"): by
        default on CUDA with ``map_ahead`` (without it the thread has only memory creation to
        take off the step, and was not measured); CPU tests set it to run the thread over the
        ``RecordingMapper``."""
        if self._background is None:
            return self.cuda and self.map_ahead
        return self._background

    @background.setter
    def background(self, value: bool) -> None:
        self._background = value

    @property
    def is_cuda(self) -> bool:
        """Whether vLLM's KV tensors are this object's VMM ranges (``allocate`` ran)."""
        return self._device is not None

    def is_usable(self, block: int) -> bool:
        """Whether every page of ``block`` is mapped here (what a step may touch)."""
        return self.layout.is_usable(block, self.mapped)

    # -- CUDA: the allocation hook's half -----------------------------------------------------

    def allocate(self, sizes: Sequence[int], device: torch.device) -> list[torch.Tensor]:
        """Reserve one virtual range per KV tensor of ``sizes`` bytes (region ``r`` of the
        layout is ``sizes[r]``), map every group for vLLM's warm-up (the first ``apply`` keeps
        only the start set), zero them, and return ``int8`` views of exactly ``sizes[r]`` bytes
        each: what vLLM's ``torch.zeros`` would have returned."""
        if len(sizes) != len(self.layout.block_bytes):
            raise ValueError(f"tokenvm elastic: vLLM allocates {len(sizes)} KV tensors, the "
                             f"layout has {len(self.layout.block_bytes)} regions; file a bug")
        index = device.index if device.index is not None else 0
        import torch

        mapper = VmmMapper.allocate(self.layout, index, compiled=self.compiled_maps)
        self.mapper = mapper
        self._ranges = list(mapper.ranges)
        self._device = device
        self.mapped = set()

        tensors = [rng.as_tensor(torch.int8, (size,)) for rng, size in
                   zip(mapper.ranges, sizes, strict=True)]
        try:
            self._map_all(self.start, zero=False)
            self.map_all_for_warm_up(zero=False)
        except CudaDriverError as err:
            if err.code != CUDA_ERROR_OUT_OF_MEMORY:
                raise
            total = self.layout.total_bytes
            free, _ = torch.cuda.mem_get_info(device)
            mapped, self.mapped = len(self.mapped), set()
            self.release()  # vLLM gives up start-up; leave no mapping behind in this process
            raise RuntimeError(
                f"tokenvm elastic: vLLM's warm-up needs the whole KV range mapped for a moment "
                f"({total / 2**30:.2f} GiB) and GPU {index} had {free / 2**30:.2f} GiB free "
                f"after {mapped} of {self.layout.num_groups} page groups; start this "
                f"server once the other servers on this GPU have started (each gives its "
                f"warm-up memory back right after start-up), or lower --kv-cache-memory-bytes"
            ) from err
        for tensor in tensors:  # one memset per tensor rather than one per page
            tensor.zero_()
        torch.cuda.current_stream(device).synchronize()
        logger.info("TokenVM elastic: %d KV tensors of %s bytes reserved as CUDA VMM ranges, "
                    "all %d page groups mapped for vLLM's warm-up; %d stay mapped from the "
                    "first step (%d bytes)", len(sizes), sorted(set(sizes)),
                    self.layout.num_groups, len(self.start),
                    sum(self.layout.group_bytes(g) for g in self.start))
        return tensors

    def map_all_for_warm_up(self, zero: bool = True) -> None:
        """Map every group (see the module docstring: vLLM's warm-up writes blocks 1..N)."""
        self._map_all([g for g in range(self.layout.num_groups) if g not in self.mapped], zero)
        self.warming_up = True

    def _end_warm_up(self) -> None:
        """Unmap every group outside the start set once warm-up is over (device synchronised:
        the warm-up's kernels may still be queued); their memory becomes the reserve, as far
        as the first metadata's target asks."""
        self._sync()
        for group in sorted(self.mapped - set(self.start)):
            self._unmap(group)
        self.warming_up = False

    def _zero(self, group: int) -> None:
        """Zero ``group``'s pages (a cudaMemset on the current stream)."""
        import torch

        page = self.layout.page_bytes
        for rng, pages in zip(self._ranges, self.layout.region_pages, strict=True):
            if group < pages:
                rng.as_tensor(torch.int8, (page,), offset_bytes=group * page).zero_()

    # -- the protocol -------------------------------------------------------------------------

    def _map_all(self, groups: Sequence[int], zero: bool = True) -> None:
        for group in groups:
            self.mapper.map_group(group)
            self.mapped.add(group)
            if zero and self.is_cuda:
                self._zero(group)

    def _map_reserved(self, group: int) -> None:
        """A scheduler command: map ``group`` with reserved memory. Without any (a scheduler
        that mapped more than was reported reserved: a bug) the CPU check fails; on a GPU the
        map creates memory, and fails only if the device is full. A premapped group is only
        marked mapped (the step's stream waits for its zeroing; a group the thread is still
        premapping is waited for); a reserve that is all premapped elsewhere gives up its
        highest group."""
        event: Any = None
        with self._cond:
            while self._inflight == group:
                self._cond.wait()
            hit = group in self.premapped
            if hit:
                self.premapped.remove(group)
                event = self._zeroed.pop(group, None)
                self.mapped.add(group)
        if hit:
            if event is not None:
                import torch

                torch.cuda.current_stream(self._device).wait_event(event)
            self.premap_hits += 1
            return
        with self._exclusive():
            if self.mapper.spare_groups() == 0 and self.premapped:
                self._unpremap(1)
            if self.mapper.spare_groups() == 0:
                if not self.is_cuda:
                    raise AssertionError(f"tokenvm elastic: group {group} mapped with nothing "
                                         "reserved (the scheduler mapped more than was "
                                         "reported)")
                logger.warning("TokenVM elastic: mapping page group %d with no reserved "
                               "memory left (a bug: please report it)", group)
            self._map_all((group,))

    def _unmap(self, group: int) -> None:
        """Unmap ``group``, keeping its memory in the reserve while that is short (inside
        ``_exclusive``)."""
        self.mapper.unmap_group(group, keep=self.reserved() < self.reserve_target)
        self.mapped.discard(group)

    def reserved(self) -> int:
        """Whole groups of memory held beyond the scheduler's mapped groups: spare, premapped.
        A group the thread is premapping is not counted (its pages leave the spare one range
        at a time): a report may say one group less than is held, never more."""
        return self.mapper.spare_groups() + len(self.premapped)

    def _sync(self) -> None:
        """Wait for every kernel and copy queued on the device (CUDA only)."""
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self._device)

    def _unpremap(self, count: int) -> None:
        """Turn the ``count`` highest premapped groups back into spare memory (inside
        ``_exclusive``; the device is synchronised first: their zeroing may still be queued)."""
        self._sync()
        for group in sorted(self.premapped, reverse=True)[:count]:
            self.mapper.unmap_group(group, keep=True)
            self.premapped.remove(group)
            self._zeroed.pop(group, None)

    def _trim(self, target: int) -> None:
        """Hold at most ``target`` groups of reserve: spare memory goes first, then premapped
        groups, highest first. A step with nothing to give back leaves the thread alone; a
        unit the thread is in counts as one more group (it may have started under a higher
        target: an idle period's last step must not leave its memory behind)."""
        if self.reserved() + self._busy <= target:
            return
        with self._exclusive():
            self.mapper.trim(max(0, target - len(self.premapped)))
            if len(self.premapped) > target:
                self._unpremap(len(self.premapped) - target)
                self.mapper.trim(max(0, target - len(self.premapped)))

    def apply(self, commands: Sequence[Command], reserve: int = 0) -> None:
        """Apply one step's commands in order, then keep at most ``reserve`` groups reserved.
        Maps: with reserved memory, zeroed on the current stream (ordered before the step's
        loads and forward; see the module docstring). Unmaps: the device is synchronised once,
        before the first, so no queued kernel or copy still reads or writes the pages. A map
        the reserve does not cover creates memory and, if the device is full, raises: the
        scheduler has already handed the blocks out, serving on would fault (``ReserveLedger``
        keeps the scheduler from asking that)."""
        start = time.perf_counter()
        self.history.append(list(commands))
        self.applied += 1
        self.reserve_target = reserve
        if self.warming_up:
            with self._exclusive():
                self._end_warm_up()
        synced = False
        for op, group in commands:
            if op == "map":
                self._map_reserved(group)
                self.maps += 1
            elif op == "unmap":
                with self._exclusive():
                    if not synced:
                        self._sync()
                        synced = True
                    self._unmap(group)
                self.unmaps += 1
            else:
                raise ValueError(f"tokenvm elastic: unknown command {op!r} (a bug)")
        self._trim(reserve)
        if commands:
            self.apply_seconds.append(time.perf_counter() - start)

    def take_apply_seconds(self) -> list[float]:
        seconds, self.apply_seconds = self.apply_seconds, []
        return seconds

    def refill(self) -> tuple[int, int]:
        """Have the reserve filled to ``reserve_target`` groups: memory created and, with
        ``map_ahead``, mapped and zeroed at the groups the scheduler maps next. Called after
        the step's forward was launched (``build_worker_meta``). With ``background`` the thread
        does it and this returns at once; otherwise it is done here. Returns the report for the
        scheduler, ``(metadata applied, groups reserved)``, counting only finished work. A
        device without room reserves less (logged once until the reserve is full again)."""
        self._create_failed = False
        if self.background and self.thread_error is None:
            with self._cond:
                # Wake the thread only for work: each wake-up is a GIL hand-off that the
                # worker's step waits through (module docstring, "Background": W16).
                if self._next_unit() is not None:
                    self._wanted = True
                    self.wakeups += 1
                    self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="tokenvm-elastic-reserve")
                self._thread.start()
        else:
            while (unit := self._next_unit(batch=True)) is not None:
                self._finish_unit(unit, self._do_unit(unit))
        return self.report()

    def report(self) -> tuple[int, int]:
        """``(metadata applied, groups reserved)``: what the scheduler's ``ReserveLedger`` is
        told."""
        return self.applied, self.reserved()

    # -- the reserve's units of work, on the background thread or inline -------------------

    def _next_unit(self, batch: bool = False) -> tuple[str, int] | None:
        """The next unit of reserve work (``_cond`` held, or no thread): ``("premap", g)``
        maps spare memory at the lowest group neither mapped, premapped nor in flight;
        ``("create", n)`` creates ``n`` more groups' memory while the reserve is short of the
        target: one on the thread (so a step never waits for more), all that is missing
        with ``batch`` (inline: one ``add_spares`` call per range, as it always was); None
        when there is nothing to do."""
        if self.map_ahead and self.mapper.spare_groups() > 0:
            for group in range(self.layout.num_groups):
                if (group not in self.mapped and group not in self.premapped
                        and group != self._inflight):
                    return "premap", group
        short = self.reserve_target - self.reserved()
        if not self._create_failed and short > 0:
            return "create", short if batch else 1
        return None

    def _do_unit(self, unit: tuple[str, int]) -> Any:
        """Do ``unit``'s driver work (no lock held: the caller owns the mapper until
        ``_finish_unit``). Returns the zeroing's CUDA event of a premap on the thread."""
        kind, value = unit  # a count of groups to create, or the group to premap
        if kind == "create":
            wanted = self.mapper.spare_groups() + value
            if self.mapper.refill(wanted) < wanted:
                self._create_failed = True
            return None
        group = value
        self.mapper.map_group(group)
        if not self.is_cuda:
            return None
        if threading.current_thread() is not self._thread:
            self._zero(group)  # inline: on the current stream, ahead of the next step's work
            return None
        import torch

        if self._stream is None:
            self._stream = torch.cuda.Stream(self._device)
        with torch.cuda.stream(self._stream):
            self._zero(group)
            event = torch.cuda.Event()
            event.record(self._stream)
        return event

    def _finish_unit(self, unit: tuple[str, int], event: Any) -> None:
        """Book a finished unit (``_cond`` held, or no thread), and log a reserve that the
        device could not fill, once until it is full again."""
        kind, group = unit
        if kind == "premap":
            self.premapped.add(group)
            if event is not None:
                self._zeroed[group] = event
        short = self.reserve_target - self.reserved()
        if self._create_failed and short > 0 and self._refill_failed_at is None:
            self._refill_failed_at = self.applied
            logger.warning("TokenVM elastic: the device has no memory for %d more page "
                           "groups; %d reserved, growth waits until memory comes free",
                           short, self.reserved())
        elif short <= 0 and self._refill_failed_at is not None:
            self._refill_failed_at = None
            logger.info("TokenVM elastic: page-group reserve full again (%d groups)",
                        self.reserved())

    def _run(self) -> None:
        """The background thread: one unit at a time while ``refill`` wants work and no
        ``_exclusive`` section is open; sleeps otherwise. A failure is logged and ends the
        thread (``refill`` then works inline, where a persistent driver error surfaces)."""
        if self._device is not None:
            import torch

            torch.cuda.set_device(self._device)
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    unit = None
                    if not self._paused and self._wanted:
                        unit = self._next_unit()
                        if unit is None:
                            self._wanted = False  # all done until the next refill
                            self._cond.notify_all()  # (``settle`` waits for this)
                    if unit is not None:
                        break
                    self._cond.wait()
                self._busy = True
                self._inflight = unit[1] if unit[0] == "premap" else None
            event, error = None, None
            try:
                event = self._do_unit(unit)
            except BaseException as err:  # noqa: BLE001 - logged, and the step goes on inline
                error = err
            with self._cond:
                if error is None:
                    self._finish_unit(unit, event)
                self._busy = False
                self._inflight = None
                self._cond.notify_all()
            if error is not None:
                self.thread_error = error
                logger.error("TokenVM elastic: the reserve's background thread stopped at "
                             "%s: %s; the worker fills the reserve in its step from now on",
                             unit, error)
                return

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Keep the background thread out of the mapper for the block: it finishes the unit it
        is in (at most one group's driver calls) and starts no other until the block ends."""
        if self._thread is None:
            yield
            return
        with self._cond:
            self._paused += 1
            while self._busy:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()

    def settle(self, timeout_s: float = 30.0) -> None:
        """Wait until the background thread has done what the last ``refill`` asked (tests;
        a no-op without the thread). Raises ``TimeoutError`` past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (self._thread is not None and self.thread_error is None
                   and (self._busy or self._wanted)):
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    raise TimeoutError(f"tokenvm elastic: the reserve thread did not settle "
                                       f"in {timeout_s} s")

    def release(self) -> None:
        """Stop the background thread and free the ranges (CUDA); the KV tensors viewing
        them are invalid afterwards."""
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._thread.join(timeout=30)
        if isinstance(self.mapper, VmmMapper):
            self.mapper.release()
        self._ranges = []


def build_worker_kv(kv_cache_config: Any, config: Any, vllm_config: Any = None) -> WorkerKV:
    """The worker's ``WorkerKV`` for ``config.elastic`` (``config``: a ``TokenVMConfig``).

    On CUDA it installs the allocation hook (``compat.install_elastic_kv_hook``): vLLM builds
    the connector before it allocates the KV cache, so the next allocation of a config with
    this layout becomes VMM ranges. Raises ``TokenVMConfigError`` (one line) where elastic mode
    cannot work: sleep mode (vLLM's CuMemAllocator would have to own the KV memory), data
    parallelism (dummy forwards of idle ranks)."""
    from tokenvm_vllm import compat
    from tokenvm_vllm.config import TokenVMConfigError
    from tokenvm_vllm.elastic.pool import layout_for

    layout = layout_for(kv_cache_config, config.elastic_page_bytes)
    start = initial_groups(layout, config.gpu_kv_floor_bytes, config.gpu_kv_ceiling_bytes or None)
    from vllm.platforms import current_platform

    cuda = current_platform.is_cuda_alike()
    kv = WorkerKV(layout, start, cuda=cuda, map_ahead=config.elastic_map_ahead,
                  compiled_maps=config.elastic_compiled_maps)
    if not cuda:
        return kv
    model_config = getattr(vllm_config, "model_config", None)
    if getattr(model_config, "enable_sleep_mode", False):
        raise TokenVMConfigError(
            "tokenvm: elastic=true with enable_sleep_mode=True: sleep mode frees KV memory "
            "through vLLM's CuMemAllocator, which does not own elastic mode's VMM ranges; "
            "unset one of them")
    parallel_config = getattr(vllm_config, "parallel_config", None)
    data_parallel = getattr(parallel_config, "data_parallel_size", 1)
    if isinstance(data_parallel, int) and data_parallel > 1:
        raise TokenVMConfigError(
            f"tokenvm: elastic=true with data_parallel_size={data_parallel}: an idle DP rank "
            "runs dummy forwards over stale block tables, which may name unmapped blocks; "
            "unset elastic or use data_parallel_size=1")
    num_blocks = kv_cache_config.num_blocks

    def allocate(alloc_config: Any, device: Any) -> dict[str, Any] | None:
        if kv.is_cuda or alloc_config.num_blocks != num_blocks:
            return None  # not the allocation this worker was built for (V1's profiling run)
        tensors = alloc_config.kv_cache_tensors
        for t in tensors:
            if getattr(t, "block_stride", 0):
                raise TokenVMConfigError(
                    f"tokenvm: elastic=true: vLLM packs several layers per block (KVCacheTensor"
                    f" block_stride={t.block_stride}); elastic mode maps one region per tensor: "
                    "unset elastic for this model")
            if t.size % num_blocks:
                raise TokenVMConfigError(
                    f"tokenvm: elastic=true: a KV tensor of {t.size} bytes is not {num_blocks} "
                    "equal blocks; unset elastic for this model")
        if layout_for(alloc_config, layout.page_bytes).block_bytes != layout.block_bytes:
            raise TokenVMConfigError(
                "tokenvm: elastic=true: vLLM's KV tensors in the worker differ from the "
                "connector's KV cache config; unset elastic (and file a bug)")
        views = kv.allocate([t.size for t in tensors], device)
        return {layer: view for t, view in zip(tensors, views, strict=True)
                for layer in t.shared_by}

    compat.install_elastic_kv_hook(allocate)
    return kv
