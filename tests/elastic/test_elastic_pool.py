"""``ElasticPool`` against vLLM's real ``BlockPool`` (CPU) and TokenVM's real ``TierManager``.

Geometry: 64 blocks of 256 bytes in one region, 1 KiB pages: page group g holds blocks
4g..4g+3 (16 groups). The mapper is ``RecordingMapper`` (CPU has no VMM), so the tests can also
check what would have been mapped and unmapped.
"""

from __future__ import annotations

from typing import Any

import pytest
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.request import Request

from tokenvm_vllm import compat
from tokenvm_vllm.elastic.page_groups import PageGroupLayout, RecordingMapper
from tokenvm_vllm.elastic.pool import ElasticPool
from tokenvm_vllm.keys import BlockKey
from tokenvm_vllm.tiers.manager import TierManager
from tokenvm_vllm.tiers.residency import Tier

BLOCK_SIZE = 16
NUM_BLOCKS = 64
BLOCK_BYTES = 256
PAGE = 1024  # 4 blocks per page group
GROUP_BYTES = PAGE


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Setup:
    """A fresh vLLM block pool, a host tier, and an ElasticPool over them."""

    def __init__(self, floor_groups: int = 2, ceiling_groups: int | None = None,
                 idle_s: float = 10.0, reserve_blocks: int = 0,
                 spill_capacity: int | None = None, keep_cache: bool = False,
                 layout: PageGroupLayout | None = None, mapper: RecordingMapper | None = None
                 ) -> None:
        init_none_hash(sha256)
        self.block_pool = BlockPool(NUM_BLOCKS, enable_caching=True, hash_block_size=BLOCK_SIZE)
        self.tiers = TierManager(host_slots=64, policy="lru")
        self.mapper = mapper or RecordingMapper()
        self.clock = Clock()
        self.stored: list[tuple[BlockKey, int, int]] = []  # (key, gpu block, host slot) in flight
        self.evicted_while_unreadable: list[int] = []
        self.pool = ElasticPool(
            self.block_pool, layout or PageGroupLayout([BLOCK_BYTES], NUM_BLOCKS, PAGE),
            self.mapper,
            floor_bytes=floor_groups * GROUP_BYTES,
            ceiling_bytes=None if ceiling_groups is None else ceiling_groups * GROUP_BYTES,
            idle_s=idle_s, is_spilled=self.readable, request_store=self.request_store,
            reserve_blocks=reserve_blocks, clock=self.clock, keep_cache=keep_cache,
            spill_capacity=None if spill_capacity is None else (lambda: spill_capacity))
        # Spy on vLLM's eviction: every block it drops must already be READABLE in host.
        real_evict = self.block_pool.evict_blocks

        def checked_evict(block_ids: set[int]) -> None:
            for b in block_ids:
                key = self.block_pool.blocks[b].block_hash
                if key is None or not self.readable(key):
                    self.evicted_while_unreadable.append(b)
            real_evict(block_ids)

        self.block_pool.evict_blocks = checked_evict  # type: ignore[method-assign]
        self._hasher = get_request_block_hasher(BLOCK_SIZE, sha256)
        self._next = 0

    def readable(self, key: Any) -> bool:
        return self.tiers.index.is_readable(key, Tier.HOST)

    def request_store(self, pairs: list[tuple[BlockKey, int]]) -> None:
        """What the scheduler's store planner does: reserve a WRITING host slot per key."""
        for key, block_id in pairs:
            if not self.tiers.contains(key):
                slot = self.tiers.prepare_store(key)
                assert slot is not None
                self.stored.append((key, block_id, slot))

    def finish_stores(self) -> None:
        """The workers' copies finished: the stored keys become READABLE."""
        self.tiers.complete_store([key for key, _, _ in self.stored], ok=True)
        self.stored = []

    def cache_prefix(self, num_blocks: int) -> list[int]:
        """Run one 'request' over ``num_blocks`` full blocks through vLLM's own calls
        (allocate, cache, free): its blocks end up free and prefix-cached."""
        self._next += 1
        tokens = [(self._next * 7919 + i) % 1000 + 3 for i in range(num_blocks * BLOCK_SIZE)]
        request = Request(request_id=f"r{self._next}", prompt_token_ids=tokens,
                          sampling_params=SamplingParams(max_tokens=1), pooling_params=None,
                          block_hasher=self._hasher)
        blocks = self.block_pool.get_new_blocks(num_blocks)
        self.block_pool.cache_full_blocks(request, blocks, 0, num_blocks, BLOCK_SIZE, 0)
        self.block_pool.free_blocks(reversed(blocks))
        return [b.block_id for b in blocks]

    def free_ids(self) -> set[int]:
        queue = self.block_pool.free_block_queue
        return {b.block_id for b in queue.get_all_free_blocks()}


def test_parked_blocks_are_never_handed_out():
    s = Setup(floor_groups=2)
    assert s.pool.usable_blocks == 8
    assert s.block_pool.get_num_free_blocks() == 7  # blocks 1..7 (0 is vLLM's null block)
    assert s.free_ids() == set(range(1, 8))
    assert sorted(g for op, g in s.mapper.calls if op == "map") == [0, 1]
    handed = s.block_pool.get_new_blocks(7)
    assert {b.block_id for b in handed} == set(range(1, 8))
    with pytest.raises(ValueError):
        s.block_pool.get_new_blocks(1)  # parked blocks are not free in vLLM's eyes


def test_grow_makes_blocks_usable_and_hands_them_out_first():
    s = Setup(floor_groups=2)
    cached = s.cache_prefix(3)  # 3 cached free blocks at the back of the queue
    grown = s.pool.grow(demand=12)  # 7 free, 12 wanted: two more groups (8 blocks)
    assert grown == 8 and s.pool.usable_blocks == 16
    assert s.block_pool.get_num_free_blocks() == 15
    assert s.pool.groups.mapped == {0, 1, 2, 3}
    new = {b.block_id for b in s.block_pool.get_new_blocks(8)}
    assert new == set(range(8, 16))  # the newly usable blocks, before any cached block
    assert all(s.block_pool.blocks[b].block_hash is not None for b in cached)
    assert s.pool.grow(demand=0) == 0  # nothing wanted, nothing mapped


def test_parked_is_exactly_the_unusable_blocks_through_grows_failures_and_shrinks():
    """A grow unparks only the blocks of the groups it mapped (it no longer scans every parked
    block); that must still be every block that became usable. Two regions of different block
    sizes, so blocks straddle pages and a block needs two or three groups; some maps fail
    midway (a partial grow); idle shrinks park blocks again."""
    import random

    layout = PageGroupLayout([256, 384], NUM_BLOCKS, PAGE)  # 24 groups
    mapper = RecordingMapper(fail_on={5, 11, 17})
    s = Setup(floor_groups=1, idle_s=10, layout=layout, mapper=mapper)
    rng = random.Random(7)

    def check() -> None:
        mapped = s.pool.groups.mapped
        unusable = {b for b in range(1, NUM_BLOCKS) if not layout.is_usable(b, mapped)}
        assert s.pool.parked == unusable
        assert s.pool.usable_blocks == NUM_BLOCKS - len(unusable)

    check()
    held: list[Any] = []
    for step in range(300):
        if step % 60 == 30:
            mapper.fail_on.clear()  # the device has room again
        if step % 60 == 0:
            mapper.fail_on.update({5, 11, 17})
        s.pool.grow(demand=rng.randrange(0, 24))
        check()
        free = s.block_pool.get_num_free_blocks()
        if free and rng.random() < 0.6:
            held.extend(s.block_pool.get_new_blocks(rng.randrange(1, free + 1)))
        if held and rng.random() < 0.5:
            rng.shuffle(held)
            cut = rng.randrange(0, len(held) + 1)
            s.block_pool.free_blocks(held[cut:])
            held = held[:cut]
        if rng.random() < 0.1:  # an idle period: everything free, shrink to the floor
            s.block_pool.free_blocks(held)
            held = []
            s.pool.observe()
            s.clock.now += 11
            s.pool.maybe_shrink()
            s.finish_stores()
            s.pool.maybe_shrink()
            check()
    assert s.pool.take_counters().unparked_blocks > 0


def test_keep_cache_grows_instead_of_letting_vllm_evict_cached_blocks():
    """The floor's 7 free blocks all hold cached prefixes. A request wanting 4 blocks: without
    ``keep_cache`` they count as free (vLLM would evict 4 of them); with it the pool grows a
    group and the prefixes stay cached (an H200 long-context run recomputed 2.1x the prompt
    tokens growing only for requests)."""
    plain = Setup(floor_groups=2)
    plain.cache_prefix(7)
    assert plain.pool.grow(demand=4) == 0
    keep = Setup(floor_groups=2, keep_cache=True)
    cached = keep.cache_prefix(7)
    assert keep.pool.grow(demand=4) == 4 and keep.pool.usable_blocks == 12
    keep.block_pool.get_new_blocks(4)
    assert all(keep.block_pool.blocks[b].block_hash is not None for b in cached)
    keep_ceiling = Setup(floor_groups=2, ceiling_groups=2, keep_cache=True)
    keep_ceiling.cache_prefix(7)
    assert keep_ceiling.pool.grow(demand=4) == 0  # at the ceiling vLLM evicts, as before


def test_grow_stops_at_the_ceiling():
    s = Setup(floor_groups=1, ceiling_groups=3)
    assert s.pool.grow(demand=100) == 8
    assert s.pool.usable_blocks == 12 and len(s.pool.groups.mapped) == 3
    assert s.pool.grow(demand=100) == 0


def test_shrink_never_takes_a_block_in_use():
    s = Setup(floor_groups=1, idle_s=10)
    s.pool.grow(demand=20)  # 6 groups: blocks 0..23
    held = s.block_pool.get_new_blocks(20)  # blocks 1..23 minus what stays free
    held_ids = {b.block_id for b in held}
    # release all but the blocks of group 4 (16..19): they stay in use
    s.block_pool.free_blocks([b for b in held if not 16 <= b.block_id <= 19])
    s.pool.observe()
    s.clock.now += 11
    assert s.pool.maybe_shrink() > 0
    assert 4 in s.pool.groups.mapped  # the group with blocks in use stays
    assert {16, 17, 18, 19} <= held_ids and not {16, 17, 18, 19} & s.pool.parked
    for b in (16, 17, 18, 19):
        assert s.block_pool.blocks[b].ref_cnt == 1  # still the request's alone
    assert s.pool.groups.mapped == {0, 4}
    assert not s.free_ids() & s.pool.parked


def test_shrink_waits_until_cached_blocks_are_readable_in_host():
    s = Setup(floor_groups=1, idle_s=10)
    s.pool.grow(demand=10)  # groups 0..2
    cached = s.cache_prefix(6)
    assert cached == [4, 5, 6, 7, 8, 9]  # the newly usable blocks were handed out first
    keys = [s.block_pool.blocks[b].block_hash for b in cached]
    s.pool.observe()
    s.clock.now += 11
    assert s.pool.maybe_shrink() == 0  # first their stores to host
    assert s.pool.shrink_pending
    assert {k for k, _, _ in s.stored} == set(keys)
    assert all(s.block_pool.get_cached_block(k[:-4], [0]) is not None for k in keys)  # cached
    assert s.pool.maybe_shrink() == 0  # stores in flight (WRITING): still waiting
    s.finish_stores()
    assert s.pool.maybe_shrink() == 2
    assert not s.pool.shrink_pending
    assert s.evicted_while_unreadable == []
    # the blocks of groups 1-2 are out of vLLM's prefix cache, parked, and in host
    for b, key in zip(cached, keys, strict=True):
        assert b in s.pool.parked and s.block_pool.blocks[b].block_hash is None
        assert s.block_pool.get_cached_block(key[:-4], [0]) is None
        assert s.readable(key)
    assert s.pool.usable_blocks == 4
    counters = s.pool.take_counters()
    assert counters.shrunk_groups == 2 and counters.spilled_blocks == 6
    assert counters.spill_store_blocks == 6 and counters.parked_blocks == 8
    assert [c for c in s.mapper.calls if c[0] == "unmap"] == [("unmap", 1), ("unmap", 2)]


def test_a_spill_larger_than_the_tiers_below_keeps_the_most_recent_and_finishes():
    """A shrink whose cached blocks outnumber what host and disk hold stores only the most
    recently used that fit and lets vLLM drop the coldest: storing them all would evict its own
    earlier stores, never finish, and flush the host tier (the H200 long-context run: 14,430
    blocks, 28 GiB, into a 20 GiB host tier)."""
    s = Setup(floor_groups=1, idle_s=10, spill_capacity=3)
    s.pool.grow(demand=10)  # groups 0..2
    cached = s.cache_prefix(6)  # freed last block first: 4 is the most recently used
    keys = {b: s.block_pool.blocks[b].block_hash for b in cached}
    s.pool.observe()
    s.clock.now += 11
    assert s.pool.maybe_shrink() == 0
    assert sorted(b for _, b, _ in s.stored) == [4, 5, 6]  # the hottest three only
    s.finish_stores()
    assert s.pool.maybe_shrink() == 2  # done: the dropped three are not waited for
    assert sorted(s.evicted_while_unreadable) == [7, 8, 9]
    assert all(s.readable(keys[b]) for b in (4, 5, 6))
    assert not any(s.tiers.contains(keys[b]) for b in (7, 8, 9))
    counters = s.pool.take_counters()
    assert counters.spill_dropped_blocks == 3 and counters.spilled_blocks == 6
    assert counters.spill_store_blocks == 3


def test_no_shrink_while_busy_or_before_idle_s():
    s = Setup(floor_groups=1, idle_s=10)
    s.pool.grow(demand=10)
    s.pool.observe()
    s.clock.now += 5
    assert s.pool.maybe_shrink() == 0  # not idle long enough
    held = s.block_pool.get_new_blocks(8)  # 8 of 12 usable in use: busy
    s.pool.observe()
    s.clock.now += 9
    assert s.pool.maybe_shrink() == 0  # the busy step restarted the clock
    s.block_pool.free_blocks(held)
    s.pool.observe()
    s.clock.now += 11
    assert s.pool.maybe_shrink() == 2
    assert s.pool.usable_blocks == 4


def test_regrow_after_shrink_reuses_the_parked_blocks():
    s = Setup(floor_groups=1, idle_s=1)
    s.pool.grow(demand=15)
    s.pool.observe()
    s.clock.now += 2
    s.pool.maybe_shrink()
    assert s.pool.usable_blocks == 4
    s.pool.grow(demand=10)
    assert s.pool.usable_blocks >= 11
    assert s.free_ids() == set(range(1, s.pool.usable_blocks))
    assert not s.free_ids() & s.pool.parked


def test_layout_must_match_the_block_pool():
    init_none_hash(sha256)
    block_pool = BlockPool(NUM_BLOCKS, enable_caching=True, hash_block_size=BLOCK_SIZE)
    with pytest.raises(ValueError, match="layout has 32 blocks"):
        ElasticPool(block_pool, PageGroupLayout([BLOCK_BYTES], 32, PAGE), RecordingMapper(),
                    floor_bytes=0, ceiling_bytes=None, idle_s=1, is_spilled=lambda k: True,
                    request_store=lambda pairs: None)


def test_nothing_to_shrink_waits_another_idle_period():
    s = Setup(floor_groups=1, idle_s=10)
    s.pool.grow(demand=6)  # groups 0..1
    held = s.block_pool.get_new_blocks(s.block_pool.get_num_free_blocks())  # all in use
    s.block_pool.free_blocks(held[:2])  # low use by count, but every group has a block in use
    s.pool.observe()
    s.clock.now += 11
    assert s.pool.maybe_shrink() == 0
    s.block_pool.free_blocks(held[2:])
    s.clock.now += 1
    assert s.pool.maybe_shrink() == 0  # the clock restarted at the failed attempt
    s.clock.now += 10
    assert s.pool.maybe_shrink() == 1


def test_lower_ceiling_shrinks_without_idle_and_stops_growth():
    s = Setup(floor_groups=1, idle_s=1000)
    s.pool.grow(demand=30)  # 8 groups: blocks 0..31
    held = s.block_pool.get_new_blocks(30)
    s.block_pool.free_blocks([b for b in held if b.block_id < 28])  # group 7 stays in use
    s.pool.observe()
    s.pool.set_ceiling(3 * GROUP_BYTES + GROUP_BYTES // 2)  # not a whole number of groups
    assert s.pool.maybe_shrink() == 5  # down to 3 groups at once, the one in use kept
    assert s.pool.groups.mapped == {0, 1, 7}
    assert s.pool.mapped_bytes <= s.pool.groups.ceiling_bytes
    assert s.pool.grow(demand=100) == 0  # at the ceiling
    s.pool.set_ceiling(0)  # below the floor: the floor
    assert s.pool.groups.ceiling_bytes == GROUP_BYTES
    assert s.pool.maybe_shrink() == 1  # group 1; group 7 is still in use, group 0 the floor
    assert s.pool.maybe_shrink() == 0
    s.block_pool.free_blocks([b for b in held if b.block_id >= 28])
    assert s.pool.maybe_shrink() == 1
    assert s.pool.groups.mapped == {0}


def test_shrink_gives_up_when_host_cannot_take_the_blocks():
    s = Setup(floor_groups=1, idle_s=10)
    s.pool.grow(demand=6)  # groups 0..1
    s.cache_prefix(4)
    s.request_store = lambda pairs: None  # type: ignore[method-assign]  # host never takes them
    s.pool.request_store = s.request_store
    s.pool.observe()
    s.clock.now += 11
    for _ in range(100):
        assert s.pool.maybe_shrink() == 0 and s.pool.shrink_pending
    assert s.pool.maybe_shrink() == 0
    assert not s.pool.shrink_pending  # the engine may stop stepping
    assert s.pool.groups.mapped == {0, 1} and s.evicted_while_unreadable == []
    s.clock.now += 5
    assert s.pool.maybe_shrink() == 0 and not s.pool.shrink_pending  # waits a new idle period


def test_no_low_use_shrink_while_serving():
    """While requests are in the engine there is no low-use shrink, not even of groups whose
    cached blocks are in host already: the cached prefixes are what the next requests hit. On
    the H200 a long-context run at 1 request/s kept a quarter of its blocks in use or fewer;
    a shrink to the floor then recomputed 1.4x the prompt tokens, and one that took only the
    groups already in host dropped 17.6 GiB of documents from the GPU that the host tier
    evicted before their revisits (2.1x recomputed, TTFT p50 10x). Once no request is left,
    the full shrink stores (and past the tiers' capacity drops) as before."""
    s = Setup(floor_groups=1, idle_s=10)
    s.pool.grow(demand=10)  # groups 0..2
    cached = s.cache_prefix(6)  # blocks 4-7 (group 1) and 8-9 (group 2)
    keys = {b: s.block_pool.blocks[b].block_hash for b in cached}
    s.request_store([(keys[b], b) for b in (8, 9)])  # group 2's are in host (write-through)
    s.finish_stores()
    s.pool.observe()
    s.clock.now += 11
    assert s.pool.maybe_shrink(serving=True) == 0
    s.clock.now += 11
    assert s.pool.maybe_shrink(serving=True) == 0
    assert [c for c in s.mapper.calls if c[0] == "unmap"] == [] and s.stored == []
    assert all(s.block_pool.blocks[b].block_hash == keys[b] for b in cached)  # still cached
    # no request left: the full shrink, storing what is not in host first
    assert s.pool.maybe_shrink(serving=False) == 0
    assert sorted(b for _, b, _ in s.stored) == [4, 5, 6, 7]
    s.finish_stores()
    assert s.pool.maybe_shrink(serving=True) == 2  # a shrink begun idle finishes
    assert s.evicted_while_unreadable == [] and s.pool.usable_blocks == 4


def test_uncached_free_blocks_are_what_vllm_hands_out_without_evicting() -> None:
    """``compat.uncached_free_blocks`` (the elastic pool's growth check and
    ``load_defer_steps``' eviction check), over vLLM's own block pool: free blocks less the
    free ones holding a cached prefix; the null block is never free. The O(1) estimate counts
    every block in use as a cached one, so blocks held without a hash (a request's partial
    last block; with prefix caching vLLM hashes every full one) make it say more uncached
    blocks than there are, never fewer."""
    s = Setup(floor_groups=NUM_BLOCKS * BLOCK_BYTES // GROUP_BYTES)  # all mapped, none parked
    pool = s.block_pool
    assert s.pool.usable_blocks == NUM_BLOCKS
    assert compat.uncached_free_blocks(pool, NUM_BLOCKS) == NUM_BLOCKS - 1
    s.cache_prefix(10)  # 10 blocks freed with their prefix cached
    assert pool.get_num_free_blocks() == NUM_BLOCKS - 1
    assert compat.uncached_free_blocks(pool, NUM_BLOCKS) == NUM_BLOCKS - 1 - 10
    held = pool.get_new_blocks(5)  # vLLM hands out uncached blocks first; these get no hash
    assert not any(pool.blocks[b.block_id].block_hash for b in held)
    truly = NUM_BLOCKS - 1 - 10 - 5
    assert truly <= compat.uncached_free_blocks(pool, NUM_BLOCKS) <= truly + len(held)
