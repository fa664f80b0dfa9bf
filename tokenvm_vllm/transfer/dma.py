"""Batched DMA between slot rows (GPU staging rows <-> pinned host-pool slots), and between
vLLM's per-layer KV tensors and host slots directly (``chunk_copies``: ``copy_path: dma``).

A DMA copy runs on the GPU's copy engines, not on its SMs, so it never competes with the model's
kernels for compute (a Triton copy kernel reading pinned memory over PCIe does: its programs hold
SMs for the whole transfer, and kernels that want every SM, such as persistent GEMMs and
attention, wait for them). Rows are ``slot_bytes`` wide in both matrices; runs of consecutive
rows on both sides become one copy, and all copies of a call go to the driver at once through
vLLM's ``swap_blocks_batch`` (``cuMemcpyBatchAsync``) when vLLM has it (``compat``), else one
``cudaMemcpyAsync`` per run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from tokenvm_vllm import compat

if TYPE_CHECKING:
    from tokenvm_vllm.transfer.triton_gather import Chunk


def row_runs(src_rows: Sequence[int], dst_rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(src_row, dst_row, count)`` runs covering the pairs ``src_rows[i] -> dst_rows[i]`` in
    order, merging pairs where both sides continue the previous one."""
    runs: list[tuple[int, int, int]] = []
    for src, dst in zip(src_rows, dst_rows, strict=True):
        if runs:
            s, d, n = runs[-1]
            if src == s + n and dst == d + n:
                runs[-1] = (s, d, n + 1)
                continue
        runs.append((src, dst, 1))
    return runs


def byte_spans(
    runs: Sequence[tuple[int, int, int]], width: int, src_split: int = 0, dst_split: int = 0
) -> list[tuple[int, int, int]]:
    """``(src_offset, dst_offset, nbytes)`` copies for row ``runs`` of ``width``-byte rows, cut
    wherever a copy would cross a multiple of ``src_split`` bytes in the source or of
    ``dst_split`` in the destination (0: never cut that side).

    Why: a lazily pinned host pool is registered with CUDA in chunks, each its own registration,
    and ``cuMemcpyBatchAsync`` refuses a copy whose host range spans two of them
    (CUDA_ERROR_INVALID_VALUE; seen on the H200 once a store's consecutive slots crossed a
    256 MiB chunk). A cut may fall inside a row when rows do not tile the chunks."""
    return [span for s, d, n in runs
            for span in _cut_span(s * width, d * width, n * width, src_split, dst_split)]


def _cut_span(src: int, dst: int, nbytes: int, src_split: int,
              dst_split: int) -> list[tuple[int, int, int]]:
    """One copy of ``nbytes`` from ``src`` to ``dst`` as ``(src, dst, nbytes)`` pieces, none
    crossing a multiple of ``src_split`` in the source or ``dst_split`` in the destination."""
    pieces = []
    while nbytes:
        size = nbytes
        for offset, split in ((src, src_split), (dst, dst_split)):
            if split:
                size = min(size, split - offset % split)
        pieces.append((src, dst, size))
        src, dst, nbytes = src + size, dst + size, nbytes - size
    return pieces


def copy_rows(
    src: torch.Tensor, dst: torch.Tensor, src_rows: Sequence[int], dst_rows: Sequence[int],
    src_split: int = 0, dst_split: int = 0,
) -> int:
    """Queue copies of ``src[src_rows[i]]`` to ``dst[dst_rows[i]]`` on the current stream.

    ``src`` and ``dst`` are 2-D ``uint8`` matrices with rows of the same width, each contiguous,
    one on the GPU and one in pinned host memory (or both on the GPU). ``src_split`` /
    ``dst_split``: the host side's registration chunk in bytes (``HostPool.pin_chunk_bytes``),
    which no single copy may cross (``byte_spans``). Returns the number of copies submitted.
    Asynchronous: the caller orders later work with events.
    """
    width = src.shape[1]
    if dst.shape[1] != width or not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("tokenvm: DMA rows must be contiguous and of one width")
    spans = byte_spans(row_runs(src_rows, dst_rows), width, src_split, dst_split)
    batch = compat.dma_batch_copy()
    if batch is None:
        src_bytes, dst_bytes = src.view(-1), dst.view(-1)
        for s, d, n in spans:
            dst_bytes[d:d + n].copy_(src_bytes[s:s + n], non_blocking=True)
        return len(spans)
    src_base, dst_base = src.data_ptr(), dst.data_ptr()
    src_ptrs = torch.tensor([src_base + s for s, _, _ in spans], dtype=torch.int64)
    dst_ptrs = torch.tensor([dst_base + d for _, d, _ in spans], dtype=torch.int64)
    sizes = torch.tensor([n for _, _, n in spans], dtype=torch.int64)
    batch(src_ptrs, dst_ptrs, sizes)
    return len(spans)


def chunk_copies(
    chunks: Sequence[Chunk], block_ids: Sequence[int], slots: Sequence[int], slot_bytes: int,
    host_base: int, host_split: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kv_ptrs, host_ptrs, sizes)``: one copy per chunk of each block, between block
    ``block_ids[i]`` of vLLM's layer tensors and slot ``slots[i]`` of the host pool at
    ``host_base`` (CPU int64 tensors for ``swap_blocks_batch``; a store copies kv -> host, a load
    host -> kv). A chunk is a run of bytes contiguous on both sides (``triton_gather.Chunk``:
    for FlashAttention's per-layer tensors a layer's K or V block, 32 KiB for Llama-3.1-8B), so
    each copy is one DMA and nothing runs on the SMs: what vLLM's native offloading does on the
    V2 runner. ``host_split``: no copy may cross a multiple of it in the host pool (a lazily
    pinned pool's registrations, see ``byte_spans``); the few that would are cut in two."""
    blocks = torch.tensor(list(block_ids), dtype=torch.int64)
    rows = torch.tensor(list(slots), dtype=torch.int64)
    kv_addr = torch.tensor([c.kv_addr for c in chunks], dtype=torch.int64)
    stride = torch.tensor([c.block_stride for c in chunks], dtype=torch.int64)
    offset = torch.tensor([c.slot_offset for c in chunks], dtype=torch.int64)
    nbytes = torch.tensor([c.nbytes for c in chunks], dtype=torch.int64)
    kv_ptrs = (kv_addr[None, :] + blocks[:, None] * stride[None, :]).reshape(-1)
    host_off = (rows[:, None] * slot_bytes + offset[None, :]).reshape(-1)
    sizes = nbytes.expand(len(blocks), -1).reshape(-1)
    if host_split:
        crossing = (host_off // host_split != (host_off + sizes - 1) // host_split).nonzero()
        if len(crossing):
            keep = torch.ones(len(sizes), dtype=torch.bool)
            keep[crossing[:, 0]] = False
            extra = [piece for i in crossing[:, 0].tolist()
                     for piece in _cut_span(int(kv_ptrs[i]), int(host_off[i]), int(sizes[i]),
                                            0, host_split)]
            kv_ptrs = torch.cat([kv_ptrs[keep], torch.tensor([e[0] for e in extra])])
            host_off = torch.cat([host_off[keep], torch.tensor([e[1] for e in extra])])
            sizes = torch.cat([sizes[keep], torch.tensor([e[2] for e in extra])])
    return kv_ptrs, host_off + host_base, sizes
