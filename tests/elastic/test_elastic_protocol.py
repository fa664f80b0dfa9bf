"""The scheduler -> workers mapping protocol of elastic GPU KV (``elastic/protocol.py``), on CPU.

vLLM's real Scheduler with TokenVM's scheduler side and two real TokenVM worker ranks
(``TwoRankHarness``). After every step's metadata reached the workers, and before the fake
forward runs, the test checks what the GPU would need: every block the step touches (the
scheduled requests' blocks, the step's loads and store) is on page groups every rank has
mapped; a group whose last command is an unmap has every block parked in the scheduler; both
ranks applied the same command list and agree with the scheduler's mapped set.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tests.connector.test_two_ranks import TwoRankHarness
from tests.elastic.test_elastic_scheduler import prompts
from tokenvm_vllm.bench.timeline import TRACE
from tokenvm_vllm.elastic.page_groups import PageGroupLayout, RecordingMapper
from tokenvm_vllm.elastic.protocol import CommandMapper, ReserveLedger, WorkerKV, initial_groups


class ProtocolViolation(AssertionError):
    pass


@dataclass
class ElasticRanks(TwoRankHarness):
    checked_blocks: int = 0
    checked_unmaps: int = 0
    recorded_unmaps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        elastic = self.connector.scheduler.elastic
        pool, unmap = elastic.pool, elastic.mapper.unmap_group

        def checked_unmap(group: int) -> None:  # at the moment the scheduler decides
            loose = [b for b in pool.layout.blocks_of_group(group) if b not in pool.parked]
            if loose:
                raise ProtocolViolation(f"group {group} unmapped with blocks {loose} unparked")
            self.recorded_unmaps += 1
            unmap(group)

        elastic.mapper.unmap_group = checked_unmap

    def _begin_step(self, workers: list[Any]) -> Any:
        output = super()._begin_step(workers)
        self._check_protocol(output)
        return output

    def _check_protocol(self, output: Any) -> None:
        elastic = self.connector.scheduler.elastic
        pool = elastic.pool
        ranks: list[WorkerKV] = [w.worker.elastic for w in self.workers]
        meta = output.kv_connector_metadata
        if any(kv.history[-1] != ranks[0].history[-1] for kv in ranks):
            raise ProtocolViolation("the ranks applied different commands")
        # The scheduler's map-ahead after the metadata was built travels with the next one.
        sent = set(pool.groups.mapped)
        for op, group in reversed(elastic.mapper.pending):
            sent.discard(group) if op == "map" else sent.add(group)
        if any(kv.mapped != sent for kv in ranks):
            raise ProtocolViolation(f"worker mapped {sorted(ranks[0].mapped)}, scheduler "
                                    f"{sorted(sent)} as of this metadata")
        if any(not kv.mapped <= kv.mapper.mapped for kv in ranks):  # (a C-level, atomic check)
            raise ProtocolViolation("a group the scheduler mapped is not mapped in the mapper")
        touched: set[int] = set()
        for req_id in output.num_scheduled_tokens:
            for ids in self.scheduler.kv_cache_manager.get_block_ids(req_id):
                touched.update(ids)
        for job in meta.loads:
            touched.update(job.gpu_block_ids)
        if meta.store is not None:
            touched.update(meta.store.gpu_block_ids)
        for block in touched:
            for kv in ranks:
                if not kv.is_usable(block):
                    raise ProtocolViolation(f"step {self.steps} uses block {block}, on a page "
                                            f"group not mapped in its metadata")
        self.checked_blocks += len(touched)
        last: dict[int, str] = {}
        for op, group in meta.elastic_commands:
            last[group] = op
        remapped = {g for op, g in elastic.mapper.pending if op == "map"}
        for group, op in last.items():
            if op != "unmap" or group in remapped:  # mapped again for the next step: usable
                continue
            loose = [b for b in pool.layout.blocks_of_group(group) if b not in pool.parked]
            if loose:
                raise ProtocolViolation(f"group {group} unmapped with blocks {loose} unparked")
            self.checked_unmaps += 1


class ExclusiveMapper(RecordingMapper):
    """A ``RecordingMapper`` whose calls take ``delay_s`` (as the driver's do) and fail if two
    threads are ever inside it at once: the worker's step and its reserve thread must take
    turns (``WorkerKV._exclusive``). ``threads`` names every thread that called it."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.threads: set[str] = set()
        self._inside: str | None = None

    def _enter(self) -> None:
        me = threading.current_thread().name
        if self._inside is not None:
            raise ProtocolViolation(f"{me} called the mapper while {self._inside} was in it")
        self._inside = me
        self.threads.add(me)
        time.sleep(self.delay_s)

    def map_group(self, group: int) -> None:
        self._enter()
        try:
            super().map_group(group)
        finally:
            self._inside = None

    def unmap_group(self, group: int, keep: bool = False) -> None:
        self._enter()
        try:
            super().unmap_group(group, keep)
        finally:
            self._inside = None

    def refill(self, groups: int) -> int:
        self._enter()
        try:
            return super().refill(groups)
        finally:
            self._inside = None

    def trim(self, groups: int) -> None:
        if self.spare <= groups:
            return  # nothing to give back: no driver call (as VirtualRange.drop_spares)
        self._enter()
        try:
            super().trim(groups)
        finally:
            self._inside = None


def on_threads(h: ElasticRanks, delay_s: float = 0.003) -> list[ExclusiveMapper]:
    """Every rank does its reserve work on its background thread (as on CUDA), through an
    ``ExclusiveMapper`` that starts from the rank's mapped set."""
    mappers = []
    for w in h.workers:
        kv: WorkerKV = w.worker.elastic
        mapper = ExclusiveMapper(delay_s)
        mapper.mapped, mapper.spare = set(kv.mapper.mapped), kv.mapper.spare_groups()
        kv.mapper, kv.background = mapper, True
        mappers.append(mapper)
    return mappers


def settle(h: ElasticRanks) -> None:
    for w in h.workers:
        w.worker.elastic.settle()


def elastic_ranks(tiny_model_config: str, **extra: Any) -> ElasticRanks:
    # as test_elastic_scheduler: 4-block page groups of 1 KiB, a floor of 2 groups
    return ElasticRanks(tiny_model_config, block_size=16, num_gpu_blocks=64, max_num_seqs=4,
                        extra_config={"elastic": True, "elastic_page_bytes": 512,
                                      "gpu_kv_floor_bytes": 2048, "shrink_idle_s": 0.3,
                                      "host_bytes": "1MiB", **extra})


def burst_idle_revisit(h: ElasticRanks, seed: int) -> None:
    burst = prompts(4, prefix_blocks=6, suffix=5, seed=seed)
    for p in burst:
        h.add(p, max_tokens=6)
    h.run()
    time.sleep(0.4)  # idle past shrink_idle_s: the first revisit shrinks, then it grows again
    for p in burst:
        h.add(p, max_tokens=6)
    h.run()
    time.sleep(0.4)  # idle again; one small request: the pool stays small this time
    h.add(prompts(1, prefix_blocks=1, suffix=3, seed=seed + 100)[0], max_tokens=2)
    h.run()


MODES = [(False, False), (True, False), (False, True), (True, True)]
MODE_IDS = ["on-demand", "map-ahead", "on-demand-thread", "map-ahead-thread"]


@pytest.mark.parametrize(("map_ahead", "thread"), MODES, ids=MODE_IDS)
def test_blocks_are_mapped_before_use_and_unmapped_after_parking_on_every_rank(
        tiny_model_config, map_ahead, thread):
    """With ``thread`` (as on CUDA) each rank's reserve work runs on its background thread,
    through a mapper whose calls take 3 ms and that fails if the step and the thread are ever
    in it at once; every step's checks above still hold."""
    h = elastic_ranks(tiny_model_config, elastic_map_ahead=map_ahead)
    kv0, kv1 = (w.worker.elastic for w in h.workers)
    assert kv0.start == (0, 1) and kv0.mapped == {0, 1}  # the floor, the null block's group
    mappers = on_threads(h) if thread else []
    burst_idle_revisit(h, seed=11)
    settle(h)
    for mapper in mappers:  # both the step and the thread used the mapper, never at once
        assert mapper.threads == {"MainThread", "tokenvm-elastic-reserve"}
        assert kv0.thread_error is None and kv1.thread_error is None
    assert kv0.history == kv1.history
    assert kv0.maps >= 6 and kv0.unmaps > 0 and kv0.maps == kv1.maps
    assert 0 < kv0.unmaps <= h.recorded_unmaps and h.checked_unmaps > 0
    assert h.checked_blocks > 100
    assert h.stats["elastic_shrunk_groups"] > 0 and h.stats["loaded_blocks"] > 0
    pool = h.connector.scheduler.elastic.pool
    # the workers' own mapper agrees with the scheduler (the CPU stand-in for cuMemMap), plus
    # what is mapped ahead of its commands, which no step touched (checked every step above)
    assert kv0.mapper.mapped == kv0.mapped | kv0.premapped
    assert not kv0.mapped & kv0.premapped
    if map_ahead:  # grows found their groups already mapped: no driver call on those steps
        assert kv0.premap_hits > 0 and kv0.premap_hits == kv1.premap_hits
    else:
        assert kv0.premap_hits == 0 and not kv0.premapped
    assert not h.connector.scheduler.elastic.mapper.pending or kv0.mapped != pool.groups.mapped


def test_a_metadata_without_its_commands_is_caught(tiny_model_config, monkeypatch):
    """Negative control: drop the commands on their way to the workers; the first step that
    uses a newly usable block must be flagged."""
    h = elastic_ranks(tiny_model_config)
    take = h.connector.scheduler.elastic.take_commands
    monkeypatch.setattr(h.connector.scheduler.elastic, "take_commands",
                        lambda: ([], take()[1]))
    with pytest.raises(ProtocolViolation):
        burst_idle_revisit(h, seed=12)


def test_start_set_is_the_floor_then_the_null_blocks_groups():
    layout = PageGroupLayout([1000], num_blocks=100, page_bytes=4096)  # ~4 blocks per page
    assert initial_groups(layout, 0, None) == (0,)  # no floor: only the null block's group
    assert initial_groups(layout, 3 * 4096, None) == (0, 1, 2)
    odd = PageGroupLayout([5000], num_blocks=10, page_bytes=4096)  # block 0 spans 2 pages
    assert initial_groups(odd, 0, None) == (0, 1)


def test_command_mapper_sends_the_difference_and_refuses_nonsense():
    m = CommandMapper(start=[0])
    m.map_group(3)
    m.map_group(1)
    m.unmap_group(3)  # mapped and unmapped before any metadata: the workers never see it
    assert m.take() == [("map", 1)]
    assert m.take() == []
    m.map_group(4)
    m.unmap_group(1)
    m.map_group(1)  # an idle shrink at an arrival, then growth for it: nothing to do for 1
    m.unmap_group(0)
    assert m.pending == m.take() == [("unmap", 0), ("map", 4)]  # unmaps first
    assert (m.maps, m.unmaps) == (4, 3)
    with pytest.raises(AssertionError, match="mapped twice"):
        m.map_group(1)
    with pytest.raises(AssertionError, match="unmapped twice"):
        m.unmap_group(3)


def test_worker_applies_commands_and_rejects_an_unknown_one():
    layout = PageGroupLayout([1024, 1024], num_blocks=16, page_bytes=4096)  # 4 blocks/group
    kv = WorkerKV(layout, initial_groups(layout, 0, None))
    assert kv.mapped == {0} and kv.is_usable(3) and not kv.is_usable(4)
    kv.apply([], reserve=2)
    assert kv.refill() == (1, 2)  # (metadata applied, groups reserved)
    kv.apply([("map", 1), ("map", 3), ("unmap", 1)], reserve=2)
    assert kv.mapped == {0, 3} and kv.is_usable(12) and not kv.is_usable(4)
    assert (kv.maps, kv.unmaps) == (2, 1)
    assert kv.mapper.spare_groups() == 1  # the unmap kept its memory: the reserve was short
    with pytest.raises(AssertionError, match="mapped twice"):
        kv.apply([("map", 3)])  # the recording mapper refuses what the GPU would corrupt
    with pytest.raises(ValueError, match="unknown command"):
        kv.apply([("remap", 2)])


def test_warm_up_maps_everything_and_the_first_step_trims_to_the_start_set():
    """vLLM 0.26's V2 warm-up writes KV into blocks 1..N before any metadata: the worker maps
    every group for it and the first step's ``apply`` gives back all but the start set."""
    layout = PageGroupLayout([1024, 1024], num_blocks=16, page_bytes=4096)  # 4 groups
    kv = WorkerKV(layout, initial_groups(layout, 4096 * 2, None))  # floor: 1 group (2 pages)
    assert kv.mapped == {0}
    kv.map_all_for_warm_up()
    assert kv.mapped == {0, 1, 2, 3} and all(kv.is_usable(b) for b in range(16))
    kv.apply([("map", 2)], reserve=1)  # the first step: trim to the start set, then its maps
    assert kv.mapped == {0, 2} and kv.mapper.mapped == {0, 2} and not kv.warming_up
    assert (kv.maps, kv.unmaps) == (1, 0)  # the trim is not a scheduler command
    # one group of the warm-up's memory became the reserve (the target), and the map took it
    # (on CPU a command map without reserved memory fails)
    assert kv.mapper.spare_groups() == 0 and kv.refill() == (1, 1)


def test_ledger_maps_only_what_every_worker_reported_reserved():
    ledger = ReserveLedger(workers=2)
    assert ledger.available() == 0  # nothing reported yet
    ledger.sent_batch(maps=0, target=4)  # metadata 1
    ledger.report([(1, 4), (1, 3)])  # rank 1 could reserve only 3 groups
    assert ledger.available() == 3 and ledger.available(pending_maps=2) == 1
    ledger.sent_batch(maps=2, target=4)  # metadata 2: two maps from the reserve
    assert ledger.available() == 1  # until a report says the refill succeeded
    ledger.report([(2, 4)])  # one worker's report only: not a step's, ignored
    assert ledger.available() == 1
    ledger.sent_batch(maps=0, target=0)  # metadata 3: idle, the workers free their reserve
    assert ledger.available() == 0  # whatever the report of metadata 2 will say
    ledger.report([(2, 4), (2, 4)])
    assert ledger.available() == 0
    ledger.report([(3, 0), (3, 0)])
    ledger.sent_batch(maps=0, target=4)  # serving again: reserved only once reported
    assert ledger.available() == 0
    ledger.report([(4, 4), (4, 4)])
    assert ledger.available() == 4


def capacity_limited(h: ElasticRanks, rank: int, groups: int) -> WorkerKV:
    """Rank ``rank``'s simulated device holds ``groups`` page groups, mapped or reserved."""
    kv: WorkerKV = h.workers[rank].worker.elastic
    assert isinstance(kv.mapper, RecordingMapper)
    kv.mapper.capacity_groups = groups
    return kv


def test_a_worker_whose_device_is_full_slows_growth_instead_of_failing(tiny_model_config):
    """Another process took rank 1's memory: it can hold 7 of the 16 page groups. Its refill
    reports less, the scheduler maps only that much (``reserve_waits``), vLLM serves the
    burst with fewer blocks, exact, and no rank maps a group it did not reserve."""
    h = elastic_ranks(tiny_model_config)
    kv1 = capacity_limited(h, rank=1, groups=7)
    burst_idle_revisit(h, seed=21)
    assert len(h.outputs) == 9
    assert max(len(m) for m in h.workers[0].worker.elastic.history) > 0
    assert kv1.maps > 0 and len(kv1.mapped) <= 7
    assert h.stats["elastic_reserve_waits"] > 0
    assert h.stats["loaded_blocks"] > 0  # the revisits came back from host, exact
    pool = h.connector.scheduler.elastic.pool
    assert pool.mapped_bytes <= 7 * pool.layout.group_bytes(0)


def test_without_the_ledger_a_full_device_would_fail_a_map_mid_step(tiny_model_config):
    """Negative control: the scheduler maps without looking at the reports; rank 1 (room for
    4 groups) then gets a map it has no memory for, which on a GPU ends the engine."""
    h = elastic_ranks(tiny_model_config)
    capacity_limited(h, rank=1, groups=4)
    h.connector.scheduler.elastic.mapper.ledger = None
    with pytest.raises(AssertionError, match="nothing reserved"):
        burst_idle_revisit(h, seed=22)


@pytest.mark.parametrize(("map_ahead", "thread"), MODES, ids=MODE_IDS)
def test_the_reserve_is_held_while_serving_and_given_back_when_idle(tiny_model_config,
                                                                    map_ahead, thread):
    h = elastic_ranks(tiny_model_config, elastic_map_ahead=map_ahead)
    kv0: WorkerKV = h.workers[0].worker.elastic
    side = h.connector.scheduler.elastic
    if thread:
        on_threads(h)
    assert h.run_idle() == 1  # the warm-up step: not serving, nothing reserved
    assert kv0.mapper.spare_groups() == 0 and side.ledger.reported == 0
    for p in prompts(4, prefix_blocks=6, suffix=5, seed=23):
        h.add(p, max_tokens=4)
    h.step()
    assert kv0.reserve_target == side.reserve_groups > 0  # the arrival asked for it
    h.run()
    settle(h)
    assert kv0.reserved() > 0 and h.stats["elastic_reserve_bytes"] > 0
    if map_ahead:  # the reserve is mapped, at the lowest groups the scheduler has not mapped
        assert kv0.premapped and kv0.mapper.spare_groups() == 0
        lowest = [g for g in range(kv0.layout.num_groups) if g not in kv0.mapped]
        assert sorted(kv0.premapped) == lowest[:len(kv0.premapped)]
    time.sleep(0.4)  # past shrink_idle_s (0.3 s) with no request
    h.run_idle()
    settle(h)
    assert kv0.reserve_target == 0 and kv0.mapper.spare_groups() == 0
    assert not kv0.premapped and kv0.mapper.mapped == kv0.mapped  # nothing held beyond
    assert side.ledger.reported == 0  # (the last report came after the last stats)
    assert side.pool.mapped_bytes == 2048  # the floor: the pool shrank in the same period


def test_map_ahead_serves_a_map_from_the_premapped_group_or_gives_one_up():
    """Unit: a worker with ``map_ahead`` maps its reserve at the lowest unmapped groups; a
    command for one of them makes no mapper call; a command for another group, with the
    reserve all premapped, unmaps the highest premapped group to map it; a lower target
    unmaps premapped groups, highest first."""
    layout = PageGroupLayout((128, 128), num_blocks=64, page_bytes=512)
    kv = WorkerKV(layout, (0, 1), map_ahead=True)
    kv.apply([], reserve=3)
    assert kv.refill() == (1, 3)
    assert kv.premapped == {2, 3, 4} and kv.mapper.spare_groups() == 0
    assert not kv.is_usable(layout.blocks_of_group(2)[0])  # not the scheduler's yet
    calls = len(kv.mapper.calls)
    kv.apply([("map", 2)], reserve=3)
    assert kv.mapper.calls[calls:] == [] and kv.premap_hits == 1
    assert kv.is_usable(layout.blocks_of_group(2)[0]) and kv.premapped == {3, 4}
    kv.refill()
    assert kv.premapped == {3, 4, 5}
    kv.apply([("map", 9)], reserve=3)  # not predicted: the highest premapped group gives way
    assert kv.mapper.calls[-2:] == [("unmap", 5), ("map", 9)]
    assert kv.premapped == {3, 4} and 9 in kv.mapped
    kv.apply([], reserve=1)
    assert kv.premapped == {3} and kv.mapper.calls[-1] == ("unmap", 4)
    assert kv.mapper.mapped == kv.mapped | {3} and kv.reserved() == 1


def test_a_lower_target_waits_for_the_threads_unit_and_leaves_no_memory_behind():
    """Unit: the reserve thread is creating memory (50 ms a call) when a step lowers the target
    to 0 (an idle period's last step): the step waits for that unit and gives everything back,
    so nothing stays held through the idle period; mapped groups are never touched."""
    layout = PageGroupLayout((128, 128), num_blocks=64, page_bytes=512)
    for map_ahead in (False, True):
        kv = WorkerKV(layout, (0, 1), map_ahead=map_ahead, background=True)
        kv.mapper = mapper = ExclusiveMapper(delay_s=0.05)
        mapper.mapped = {0, 1}
        kv.apply([], reserve=3)
        kv.refill()
        deadline = time.monotonic() + 5
        while not kv._busy and time.monotonic() < deadline:  # the thread is in its first unit
            time.sleep(0.001)
        assert kv._busy
        kv.apply([], reserve=0)
        assert kv.reserved() == 0 and mapper.spare == 0 and not kv.premapped
        kv.settle()
        assert kv.reserved() == 0 and mapper.mapped == {0, 1} and kv.thread_error is None
        assert mapper.threads == {"MainThread", "tokenvm-elastic-reserve"}
        kv.release()


def test_trace_logs_each_step_that_maps_or_changes_the_reserve(tiny_model_config, tokenvm_log):
    """``trace: true``: one ``TokenVM trace <time> elastic ...`` line per step whose metadata
    carries commands or a new reserve target (a burst's ramp, step by step), none for a step
    that changes nothing."""
    h = elastic_ranks(tiny_model_config, trace=True)
    log = tokenvm_log()
    h.run_idle()  # the warm-up step: target 0, the first line
    for p in prompts(4, prefix_blocks=6, suffix=5, seed=31):
        h.add(p, max_tokens=4)
    h.run()
    found = [TRACE.search(line) for line in log]
    events = [dict(kv.split("=") for kv in m.group(3).split()) for m in found
              if m is not None and m.group(2) == "elastic"]
    assert events[0]["target"] == "0"
    side = h.connector.scheduler.elastic
    assert any(e["target"] == str(side.reserve_groups) for e in events)  # the arrival
    maps = sum(int(e["maps"]) for e in events)
    assert maps == h.workers[0].worker.elastic.maps > 0  # every map the workers applied
    assert int(events[-1]["usable"]) == side.pool.usable_blocks or int(events[-1]["maps"]) == 0
    assert len(events) < h.steps  # steps that changed nothing logged nothing
