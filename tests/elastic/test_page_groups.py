"""Page-group accounting, the map-ahead planner and the shrink planner, on the CPU.

The mapping math is checked against a brute-force walk over every byte range; the planners are
driven by seeded random workloads through ``RecordingMapper`` (the CPU stand-in for the GPU
mapper, which asserts on double maps and unmaps).
"""

from __future__ import annotations

import random

import pytest

from tokenvm_vllm.elastic.page_groups import (
    PAGE_BYTES,
    BlockState,
    GrowPlan,
    PageGroupLayout,
    PageGroupPool,
    RecordingMapper,
    ShrinkPlan,
    ShrinkPolicy,
)

KIB, MIB = 1 << 10, 1 << 20

# (block bytes per region, num_blocks): Llama-3.1-8B in vLLM's V2 layout (16 tokens x 8 heads x
# 128 x K+V x bf16 = 64 KiB per layer, 32 layers), K and V in separate tensors (64 x 32 KiB),
# block sizes that do not divide a page, a block larger than a page, and mixed widths.
GEOMETRIES = [
    ([64 * KIB] * 32, 1000),
    ([32 * KIB] * 64, 777),
    ([96 * KIB] * 4, 300),
    ([3 * MIB] * 2, 40),
    ([MIB + 4 * KIB] * 3, 65),
    ([64 * KIB, 16 * KIB, 96 * KIB], 500),
    ([8 * KIB], 3),
]


def brute_groups(block_bytes: list[int], block: int, page: int = PAGE_BYTES) -> set[int]:
    """Every page index any byte of ``block`` falls in, in any region (byte by page walk)."""
    out: set[int] = set()
    for b in block_bytes:
        start, end = block * b, (block + 1) * b
        p = start // page
        while p * page < end:
            out.add(p)
            p += 1
    return out


@pytest.mark.parametrize("block_bytes,num_blocks", GEOMETRIES)
def test_mapping_math_matches_brute_force(block_bytes, num_blocks):
    layout = PageGroupLayout(block_bytes, num_blocks)
    inverse: dict[int, set[int]] = {}
    for blk in range(num_blocks):
        want = brute_groups(block_bytes, blk)
        assert set(layout.groups_of_block(blk)) == want, blk
        for g in want:
            inverse.setdefault(g, set()).add(blk)
    assert layout.num_groups == max(inverse) + 1
    for g in range(layout.num_groups):
        assert set(layout.blocks_of_group(g)) == inverse.get(g, set()), g
    for r, b in enumerate(block_bytes):
        assert layout.region_pages[r] == -(-num_blocks * b // PAGE_BYTES)
    # group bytes add up to every region's pages
    assert sum(layout.group_bytes(g) for g in range(layout.num_groups)) == \
        sum(layout.region_pages) * PAGE_BYTES


def test_llama_8b_numbers():
    """32 blocks of 64 KiB fill one 2 MiB page, so group g is blocks 32g..32g+31 and costs
    32 layers x 2 MiB = 64 MiB."""
    layout = PageGroupLayout([64 * KIB] * 32, 1000)
    assert layout.num_groups == 32  # ceil(1000 / 32)
    assert layout.blocks_of_group(3) == list(range(96, 128))
    assert layout.groups_of_block(100) == (3,)
    assert layout.group_bytes(0) == 64 * MIB
    assert layout.blocks_of_group(31) == list(range(992, 1000))


def test_mixed_regions_shrink_later_groups():
    """A region with fewer pages drops out of the later groups, which cost less."""
    layout = PageGroupLayout([64 * KIB, 16 * KIB], 64)  # 2 pages and 1 page
    assert layout.region_pages == (2, 1)
    assert layout.group_bytes(0) == 2 * PAGE_BYTES
    assert layout.group_bytes(1) == PAGE_BYTES


@pytest.mark.parametrize("kwargs,match", [
    ({"block_bytes": [], "num_blocks": 4}, "block_bytes"),
    ({"block_bytes": [0], "num_blocks": 4}, r"block_bytes\[0\]=0"),
    ({"block_bytes": [KIB], "num_blocks": 0}, "num_blocks=0"),
    ({"block_bytes": [KIB], "num_blocks": 4, "page_bytes": -1}, "page_bytes=-1"),
])
def test_bad_layout_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PageGroupLayout(**kwargs)


def test_pool_bad_bounds():
    layout = PageGroupLayout([64 * KIB] * 2, 128)
    with pytest.raises(ValueError, match="ceiling_bytes=1"):
        PageGroupPool(layout, RecordingMapper(), floor_bytes=2, ceiling_bytes=1)
    pool = PageGroupPool(layout, RecordingMapper(), floor_bytes=4 * MIB)
    with pytest.raises(ValueError, match="ceiling_bytes=0"):
        pool.set_ceiling(0)
    with pytest.raises(ValueError, match="demand=-1"):
        pool.plan_grow(0, -1, 0)


# -- growth ------------------------------------------------------------------------------------

def test_grow_maps_just_enough_lowest_first():
    layout = PageGroupLayout([64 * KIB] * 32, 1000)  # 32 blocks per group
    mapper = RecordingMapper()
    pool = PageGroupPool(layout, mapper)
    assert pool.plan_grow(free_blocks=10, demand=5, ahead=5) == GrowPlan((), (), 0, 0)
    plan = pool.grow(free_blocks=0, demand=40, ahead=8)  # 48 blocks: two groups
    assert plan.groups == (0, 1)
    assert plan.new_blocks == tuple(range(64))
    assert plan.bytes == 2 * 64 * MIB and plan.short_by == 0
    assert mapper.calls == [("map", 0), ("map", 1)]
    assert pool.usable_blocks() == list(range(64))


def test_grow_fills_holes_first():
    layout = PageGroupLayout([64 * KIB] * 4, 32 * 8)
    pool = PageGroupPool(layout, RecordingMapper())
    for g in (0, 1, 3, 4):
        pool.apply_grow(GrowPlan((g,), (), 0, 0))
    plan = pool.plan_grow(0, 40, 0)
    assert plan.groups == (2, 5)


def test_block_spanning_two_groups_needs_both():
    """96 KiB blocks: block 21 spans bytes 2016..2112 KiB, across pages 0 and 1."""
    layout = PageGroupLayout([96 * KIB] * 2, 100)
    assert layout.groups_of_block(21) == (0, 1)
    pool = PageGroupPool(layout, RecordingMapper())
    plan = pool.grow(0, 21, 0)  # page 0 holds blocks 0..20 whole: 21 blocks, one group
    assert plan.groups == (0,) and 21 not in plan.new_blocks
    plan = pool.grow(0, 1, 0)
    assert plan.groups == (1,) and 21 in plan.new_blocks


@pytest.mark.parametrize("block_bytes,num_blocks", GEOMETRIES)
def test_planner_never_exceeds_ceiling(block_bytes, num_blocks):
    rng = random.Random(sum(block_bytes) + num_blocks)
    layout = PageGroupLayout(block_bytes, num_blocks)
    group0 = layout.group_bytes(0)
    for _ in range(20):
        ceiling = rng.randrange(0, layout.num_groups + 1) * group0 + rng.randrange(group0)
        pool = PageGroupPool(layout, RecordingMapper(), ceiling_bytes=ceiling)
        for _ in range(30):
            usable = len(pool.usable_blocks())
            free = rng.randrange(usable + 1)
            demand, ahead = rng.randrange(num_blocks // 4 + 2), rng.randrange(8)
            plan = pool.grow(free, demand, ahead)
            assert pool.mapped_bytes == layout.bytes_of(pool.mapped) <= ceiling
            gained = len(pool.usable_blocks()) - usable
            assert gained == len(plan.new_blocks)
            if plan.short_by == 0:
                assert free + gained >= demand + ahead
            else:  # short only because the next unmapped group does not fit
                nxt = min(g for g in range(layout.num_groups) if g not in pool.mapped) \
                    if len(pool.mapped) < layout.num_groups else None
                assert nxt is None or pool.mapped_bytes + layout.group_bytes(nxt) > ceiling
            if rng.random() < 0.3:  # drop some groups, as a shrink would
                dropped = rng.sample(sorted(pool.mapped), k=len(pool.mapped) // 2)
                pool.apply_shrink(ShrinkPlan(tuple(sorted(dropped)), (), (), 0))
                assert pool.mapped_bytes == layout.bytes_of(pool.mapped)


def test_failed_map_keeps_the_mapped_set_exact():
    layout = PageGroupLayout([64 * KIB] * 32, 1000)
    mapper = RecordingMapper(fail_on={2})
    pool = PageGroupPool(layout, mapper)
    with pytest.raises(MemoryError):
        pool.grow(0, 32 * 4, 0)
    assert pool.mapped == {0, 1} == mapper.mapped


def test_ensure_floor_and_ceiling():
    layout = PageGroupLayout([64 * KIB] * 32, 1000)  # 64 MiB groups
    pool = PageGroupPool(layout, RecordingMapper(), floor_bytes=150 * MIB,
                         ceiling_bytes=180 * MIB)
    assert pool.ensure_floor() == [0, 1]  # a third group (192 MiB) would pass the ceiling
    assert pool.mapped_bytes == 128 * MIB
    pool = PageGroupPool(layout, RecordingMapper(), floor_bytes=150 * MIB)
    assert pool.ensure_floor() == [0, 1, 2]
    assert pool.mapped_bytes == 192 * MIB


# -- shrink ------------------------------------------------------------------------------------

def states_from(table: dict[int, BlockState]):
    return lambda b: table.get(b, BlockState.FREE)


def test_shrink_picks_whole_free_groups_before_cached_ones():
    layout = PageGroupLayout([64 * KIB] * 2, 32 * 6)  # 6 groups of 32 blocks, 4 MiB each
    pool = PageGroupPool(layout, RecordingMapper(), floor_bytes=8 * MIB)
    pool.grow(0, 32 * 6, 0)
    table = {b: BlockState.IN_USE for b in range(0, 10)}  # group 0 busy
    table.update({b: BlockState.CACHED for b in (33, 40, 100)})  # groups 1 and 3 cached
    plan = pool.plan_shrink(states_from(table))
    # 24 MiB mapped, floor 8: unmap 4 groups; free-only 5, 4, 2 first, then the cheaper cached
    # one (3 has one cached block, 1 has two)
    assert plan.groups == (2, 3, 4, 5)
    assert plan.spill == (100,)
    assert plan.unusable == tuple(range(64, 192))
    assert plan.bytes == 16 * MIB
    pool.apply_shrink(plan)
    assert pool.mapped == {0, 1} and pool.mapped_bytes == 8 * MIB


def test_shrink_respects_target_and_reports_short():
    layout = PageGroupLayout([64 * KIB], 32 * 4)  # 4 groups of 2 MiB
    pool = PageGroupPool(layout, RecordingMapper())
    pool.grow(0, 128, 0)
    busy = states_from({b: BlockState.IN_USE for b in range(0, 128, 32)})  # one per group
    assert pool.plan_shrink(busy, target_bytes=0).groups == ()
    plan = pool.plan_shrink(states_from({}), target_bytes=5 * MIB)  # 8 -> at least 5: one group
    assert plan.groups == (3,) and plan.bytes == 2 * MIB


@pytest.mark.parametrize("block_bytes,num_blocks", GEOMETRIES)
def test_shrink_never_unmaps_a_page_under_a_block_in_use(block_bytes, num_blocks):
    rng = random.Random(num_blocks)
    layout = PageGroupLayout(block_bytes, num_blocks)
    for _ in range(25):
        total = sum(layout.group_bytes(g) for g in range(layout.num_groups))
        floor = rng.randrange(total + 1)
        pool = PageGroupPool(layout, RecordingMapper(), floor_bytes=floor)
        pool.grow(0, num_blocks, 0)
        usable = set(pool.usable_blocks())
        table = {b: rng.choice(list(BlockState)) if rng.random() < 0.2 else BlockState.FREE
                 for b in usable}
        plan = pool.plan_shrink(states_from(table))
        in_use = {b for b, s in table.items() if s is BlockState.IN_USE}
        pool.apply_shrink(plan)
        assert pool.mapped_bytes >= floor
        assert in_use <= set(pool.usable_blocks()), "a block in use lost a page"
        lost = usable - set(pool.usable_blocks())
        assert set(plan.unusable) == lost
        assert set(plan.spill) == {b for b in lost if table[b] is BlockState.CACHED}
        # whole groups: every group in the plan is fully gone
        assert not set(plan.groups) & pool.mapped


def test_stale_shrink_plan_is_refused():
    layout = PageGroupLayout([64 * KIB], 64)
    pool = PageGroupPool(layout, RecordingMapper())
    pool.grow(0, 64, 0)
    plan = pool.plan_shrink(states_from({}))
    pool.apply_shrink(plan)
    with pytest.raises(ValueError, match="stale plan"):
        pool.apply_shrink(plan)


def test_shrink_policy_waits_for_a_quiet_period():
    policy = ShrinkPolicy(idle_s=10.0, low_use_fraction=0.25)
    assert not policy.should_shrink(0.0)
    policy.observe(0.0, in_use_blocks=90, usable_blocks=100)
    policy.observe(5.0, in_use_blocks=10, usable_blocks=100)  # quiet from here
    assert not policy.should_shrink(9.9)
    assert policy.should_shrink(10.0)
    policy.observe(11.0, in_use_blocks=50, usable_blocks=100)  # busy again: clock restarts
    assert not policy.should_shrink(20.0)
    assert policy.should_shrink(21.0)
    policy.shrank(21.0)
    assert not policy.should_shrink(30.0)
    with pytest.raises(ValueError, match="idle_s=0"):
        ShrinkPolicy(idle_s=0)
    with pytest.raises(ValueError, match="low_use_fraction=1.5"):
        ShrinkPolicy(idle_s=1, low_use_fraction=1.5)
