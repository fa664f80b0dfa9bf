"""``VmmMapper``'s own logic on the CPU: which range gets which page, and the roll-back when a
page in the middle of a group fails. The ranges here are stand-ins (a CPU machine cannot map GPU
memory); the real ``VirtualRange`` path runs in ``tests/gpu/test_vmm.py``."""

from __future__ import annotations

import pytest

from tokenvm_vllm.elastic.page_groups import PAGE_BYTES, PageGroupLayout, VmmMapper


class StandInRange:
    """Test double with VirtualRange's map/unmap/spare surface; page ``fail_page`` fails to map
    (after taking a spare handle, as a failing cuMemMap would); at most ``room`` handles can be
    created."""

    def __init__(self, num_pages: int, fail_page: int | None = None, room: int = 1 << 30) -> None:
        self.page_bytes = PAGE_BYTES
        self.num_pages = num_pages
        self.mapped: set[int] = set()
        self.fail_page = fail_page
        self.spare_count = 0
        self.room = room

    def map(self, page: int) -> None:
        assert page not in self.mapped
        if page == self.fail_page:
            raise MemoryError("simulated CUDA_ERROR_OUT_OF_MEMORY")
        if self.spare_count:
            self.spare_count -= 1
        self.mapped.add(page)

    def unmap(self, page: int, keep_handle: bool = False) -> None:
        self.mapped.remove(page)
        self.spare_count += keep_handle

    def add_spares(self, count: int, compiled: object = None) -> int:
        assert compiled is None  # (the stand-in mapper has no compiled loop)
        made = max(0, min(count, self.room - self.spare_count - len(self.mapped)))
        self.spare_count += made
        return made

    def drop_spares(self, keep: int = 0) -> None:
        self.spare_count = min(self.spare_count, keep)


def test_group_maps_page_g_of_each_range_that_has_it():
    layout = PageGroupLayout([64 << 10, 16 << 10], 64)  # 2 pages and 1 page
    ranges = [StandInRange(2), StandInRange(1)]
    mapper = VmmMapper(layout, ranges)  # type: ignore[arg-type]
    mapper.map_group(1)
    assert ranges[0].mapped == {1} and ranges[1].mapped == set()
    mapper.map_group(0)
    assert ranges[0].mapped == {0, 1} and ranges[1].mapped == {0}
    mapper.unmap_group(0)
    assert ranges[0].mapped == {1} and ranges[1].mapped == set()


def test_failure_mid_group_unmaps_what_it_mapped():
    layout = PageGroupLayout([64 << 10] * 4, 64)
    ranges = [StandInRange(2), StandInRange(2), StandInRange(2, fail_page=1), StandInRange(2)]
    mapper = VmmMapper(layout, ranges)  # type: ignore[arg-type]
    with pytest.raises(MemoryError):
        mapper.map_group(1)
    assert all(not r.mapped for r in ranges)
    mapper.map_group(0)  # other groups still map
    assert all(r.mapped == {0} for r in ranges)


def test_range_count_and_size_checked():
    layout = PageGroupLayout([64 << 10] * 2, 64)
    with pytest.raises(ValueError, match="1 ranges for 2 regions"):
        VmmMapper(layout, [StandInRange(2)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="range 1 has 1 pages"):
        VmmMapper(layout, [StandInRange(2), StandInRange(1)])  # type: ignore[list-item]


def test_reserve_is_whole_groups_refilled_until_a_range_is_full_and_trimmed():
    layout = PageGroupLayout([64 << 10, 64 << 10], 64)  # 2 ranges of 2 pages
    ranges = [StandInRange(2), StandInRange(2, room=1)]
    mapper = VmmMapper(layout, ranges)  # type: ignore[arg-type]
    assert mapper.spare_groups() == 0
    assert mapper.refill(2) == 1  # the second range has room for one page only
    assert [r.spare_count for r in ranges] == [2, 1]
    mapper.map_group(0)  # from the reserve: one spare of each range
    assert mapper.spare_groups() == 0 and [r.spare_count for r in ranges] == [1, 0]
    mapper.unmap_group(0, keep=True)  # back into the reserve
    assert mapper.spare_groups() == 1
    mapper.trim(0)
    assert [r.spare_count for r in ranges] == [0, 0]
