"""``VmmMapper``'s own logic on the CPU: which range gets which page, and the roll-back when a
page in the middle of a group fails. The ranges here are stand-ins (a CPU machine cannot map GPU
memory); the real ``VirtualRange`` path runs in ``tests/gpu/test_vmm.py``."""

from __future__ import annotations

import pytest

from tokenvm_vllm.elastic.page_groups import PAGE_BYTES, PageGroupLayout, VmmMapper


class StandInRange:
    """Test double with VirtualRange's map/unmap surface; page ``fail_page`` fails to map."""

    def __init__(self, num_pages: int, fail_page: int | None = None) -> None:
        self.page_bytes = PAGE_BYTES
        self.num_pages = num_pages
        self.mapped: set[int] = set()
        self.fail_page = fail_page

    def map(self, page: int) -> None:
        assert page not in self.mapped
        if page == self.fail_page:
            raise MemoryError("simulated CUDA_ERROR_OUT_OF_MEMORY")
        self.mapped.add(page)

    def unmap(self, page: int) -> None:
        self.mapped.remove(page)


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
