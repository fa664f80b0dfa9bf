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


def test_byte_spans_never_cross_a_split_on_either_side() -> None:
    from tokenvm_vllm.transfer.dma import byte_spans

    # rows of 3 bytes; host chunks of 8 bytes: runs are cut at 8, 16, ... (inside rows too)
    assert byte_spans([(0, 0, 4)], 3, dst_split=8) == [(0, 0, 8), (8, 8, 4)]
    assert byte_spans([(1, 5, 2)], 3, src_split=8) == [(3, 15, 5), (8, 20, 1)]
    assert byte_spans([(0, 1, 3)], 4, src_split=8, dst_split=6) == [
        (0, 4, 2), (2, 6, 6), (8, 12, 4)]
    assert byte_spans([(2, 0, 1)], 3) == [(6, 0, 3)]  # no split: one copy per run
    for src_split, dst_split in ((5, 0), (0, 7), (4, 6), (64, 64)):
        for s, d, n in byte_spans([(0, 3, 9), (11, 1, 2)], 5, src_split, dst_split):
            assert n > 0
            if src_split:
                assert s // src_split == (s + n - 1) // src_split
            if dst_split:
                assert d // dst_split == (d + n - 1) // dst_split


def test_copy_rows_cut_at_registration_chunks_keeps_every_byte() -> None:
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(0, 256, (10, 48), dtype=torch.uint8, generator=gen)
    dst = torch.zeros((16, 48), dtype=torch.uint8)
    src_rows, dst_rows = list(range(10)), list(range(3, 13))
    copies = copy_rows(src, dst, src_rows, dst_rows, dst_split=100)  # rows straddle chunks
    assert copies > 1
    for s, d in zip(src_rows, dst_rows, strict=True):
        assert torch.equal(dst[d], src[s])
    assert int(dst[:3].sum()) == 0 and int(dst[13:].sum()) == 0
