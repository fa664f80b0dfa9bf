"""DMA row copies (transfer/dma.py): run merging and every byte, on CPU tensors (the fallback
path; the batched driver call is exercised on the GPU by tests/gpu)."""

import torch

from tokenvm_vllm.transfer.dma import copy_rows, row_runs


def test_row_runs_merge_only_where_both_sides_continue() -> None:
    assert row_runs([0, 1, 2, 5, 6, 9], [10, 11, 12, 13, 14, 20]) == [
        (0, 10, 3), (5, 13, 2), (9, 20, 1)]
    assert row_runs([0, 1], [4, 3]) == [(0, 4, 1), (1, 3, 1)]
    assert row_runs([], []) == []


def test_copy_rows_every_byte_and_nothing_else() -> None:
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (8, 64), dtype=torch.uint8, generator=gen)
    dst = torch.zeros((12, 64), dtype=torch.uint8)
    src_rows, dst_rows = [0, 1, 2, 7, 3], [4, 5, 6, 0, 11]
    runs = copy_rows(src, dst, src_rows, dst_rows)
    assert runs == 3
    for s, d in zip(src_rows, dst_rows, strict=True):
        assert torch.equal(dst[d], src[s])
    untouched = [r for r in range(12) if r not in dst_rows]
    assert int(dst[untouched].sum()) == 0
