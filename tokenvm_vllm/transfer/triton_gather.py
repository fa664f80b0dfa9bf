"""One Triton launch moves N blocks of every layer between vLLM's KV cache and slot rows.

A *slot row* is ``KVLayout.slot_bytes`` bytes holding one block of every layer, each layer's part
at ``LayerLayout.offset`` in the byte order ``TorchCopyEngine`` writes: ``LayerLayout.blocks_view``
(physical order) with the block dimension removed. The rows live in one ``uint8`` matrix,
addressed only as ``base + row * row_stride``: a GPU scratch tensor, or (on CUDA) a pinned host
tensor that the kernel reads and writes directly through unified virtual addressing (UVA), so a
row can be a host-pool slot and no staging copy is needed.

Why one launch for all layers: with per-layer torch indexing a step costs ``2 x layers`` kernels
and copies (64 for Llama-3.1-8B); here the per-layer tensors are reached through a small device
table of raw addresses built once, and a single generic "copy these chunks" kernel does the rest.

Each layer's block is described as *chunks*: runs of bytes contiguous both in the layer tensor
and in the slot row. Chunk ``c`` of block ``b`` of a layer starts at
``kv_base + c_offset + b * block_stride`` in the tensor and at ``offset + c * chunk_bytes`` in the
row. The chunk is the longest suffix of the dimensions after the block dimension that is laid out
contiguously (row-major); every other dimension (those before the block dimension, and any
non-contiguous ones after it) enumerates chunks. For FlashAttention's ``(2, blocks, block_size,
heads, head_size)`` that is the K chunk and the V chunk (32 KiB each for Llama-3.1-8B in bf16);
chunks adjacent on both sides are merged (e.g. a blocks-first physical order gives one chunk).
Layouts whose chunks would be smaller than ``min_chunk_bytes`` are refused with ``ValueError``:
they would be copied correctly but slowly, and the caller should use ``TorchCopyEngine`` instead.

Tests run the kernel on CPU tensors under ``TRITON_INTERPRET=1`` (which must be set before this
module is imported: ``triton.jit`` picks the interpreter at decoration time).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tokenvm_vllm.transfer.layout import KVLayout

DEFAULT_MIN_CHUNK_BYTES = 256
"""Below this chunk size the constructor refuses the layout (see the module docstring)."""

_MAX_TILE_BYTES = 8192
"""Bytes one program moves per loop iteration (at most): 8 warps x 32 threads x 32 bytes."""

# Widest element first; the copy uses the widest one that every address and size is aligned to.
_ELEMENTS: tuple[tuple[int, tl.dtype], ...] = ((8, tl.int64), (4, tl.int32), (2, tl.int16),
                                               (1, tl.int8))
_TABLE_COLS = 4  # kv_addr, block_stride, slot_offset, chunk_bytes (all in bytes, int64)


@triton.jit(do_not_specialize=["slot_base", "row_stride", "num_entries", "num_jobs"])
def _copy_chunks_kernel(
    table_ptr,  # int64 [num_entries, 4]: kv address (block 0), block stride, slot offset, size
    block_ids_ptr,  # int64 [N]: block index in every layer's tensor
    row_ids_ptr,  # int64 [N]: slot row of each block (read only when HAS_ROW_IDS)
    slot_base,  # address of row 0 of the slot matrix
    row_stride,  # bytes from one slot row to the next
    num_entries,
    num_jobs,  # N * num_entries: one job = one chunk of one block
    TO_SLOTS: tl.constexpr,  # True: KV cache -> slot rows (gather); False: the reverse (scatter)
    HAS_ROW_IDS: tl.constexpr,
    ELEM: tl.constexpr,  # integer type the bytes are moved as (its width divides every address)
    ELEM_BYTES: tl.constexpr,
    ALIGN: tl.constexpr,  # bytes every chunk address is a multiple of: a hint for vector loads
    BLOCK: tl.constexpr,  # elements per loop iteration
):
    offs = tl.arange(0, BLOCK)
    job = tl.program_id(0)
    step = tl.num_programs(0)
    # Grid-stride loop: the caller may cap the number of programs (e.g. to leave SMs to the model
    # while a store runs beside the forward pass); consecutive jobs walk a slot row in order, so
    # writes to host memory go out as long sequential runs.
    while job < num_jobs:
        i = job // num_entries
        e = job - i * num_entries
        entry = table_ptr + e * 4
        block = tl.load(block_ids_ptr + i)
        kv_addr = tl.load(entry) + block * tl.load(entry + 1)
        if HAS_ROW_IDS:
            row = tl.load(row_ids_ptr + i)
        else:
            row = i.to(tl.int64)
        # int64 throughout: a pinned host pool is many GiB, row * row_stride overflows int32.
        slot_addr = slot_base.to(tl.int64) + row * row_stride.to(tl.int64) + tl.load(entry + 2)
        # Chunk sizes are multiples of ALIGN too; saying so lets the bounds mask stay uniform over
        # a vector, so the compiler can emit 16-byte accesses despite the mask.
        n = tl.multiple_of(tl.load(entry + 3) // ELEM_BYTES, ALIGN // ELEM_BYTES)
        kv_ptr = tl.multiple_of(kv_addr.to(tl.pointer_type(ELEM)), ALIGN)
        slot_ptr = tl.multiple_of(slot_addr.to(tl.pointer_type(ELEM)), ALIGN)
        if TO_SLOTS:
            src = kv_ptr
            dst = slot_ptr
        else:
            src = slot_ptr
            dst = kv_ptr
        for start in range(0, n, BLOCK):
            idx = start + offs
            mask = idx < n
            tl.store(dst + idx, tl.load(src + idx, mask=mask), mask=mask)
        job += step


@dataclass(frozen=True)
class Chunk:
    """One run of bytes of a block, contiguous in the layer tensor and in the slot row."""

    kv_addr: int
    """Address of this chunk of block 0 in the layer tensor."""
    block_stride: int
    """Bytes from one block of the layer to the next."""
    slot_offset: int
    """Byte offset of the chunk inside a slot row."""
    nbytes: int


def layer_chunks(kv: torch.Tensor, block_dim: int, slot_offset: int) -> list[Chunk]:
    """Chunks of one block of ``kv`` (blocks along ``block_dim``), in slot-row byte order.

    The slot-row order is ``kv``'s logical order without the block dimension (callers pass
    ``LayerLayout.blocks_view(kv)``, whose logical order is the physical one), so the chunk is the
    longest suffix of the trailing dimensions that is contiguous in memory, and the remaining
    dimensions (row-major, block dimension left out) enumerate chunks. Adjacent chunks that are
    contiguous in the tensor too are merged.
    """
    shape, strides = list(kv.shape), list(kv.stride())
    elem = kv.element_size()
    if any(stride == 0 and size > 1 for size, stride in zip(shape, strides, strict=True)):
        raise ValueError(
            f"tokenvm: KV tensor with shape {tuple(shape)} and strides {tuple(strides)} has an "
            "expanded (zero-stride) dimension; blocks would alias")
    suffix_start = len(shape)
    expected = 1
    for d in range(len(shape) - 1, block_dim, -1):
        if shape[d] != 1:  # a dimension of size 1 never breaks contiguity, whatever its stride
            if strides[d] != expected:
                break
            expected *= shape[d]
        suffix_start = d
    chunk_bytes = math.prod(shape[suffix_start:]) * elem
    chunk_dims = [d for d in range(suffix_start) if d != block_dim]
    chunks: list[Chunk] = []
    if chunk_bytes == 0 or any(shape[d] == 0 for d in chunk_dims):
        return chunks
    base = kv.data_ptr()
    block_stride = strides[block_dim] * elem
    for c, index in enumerate(_row_major([shape[d] for d in chunk_dims])):
        addr = base + sum(i * strides[d] * elem for i, d in zip(index, chunk_dims, strict=True))
        offset = slot_offset + c * chunk_bytes
        last = chunks[-1] if chunks else None
        if last is not None and last.kv_addr + last.nbytes == addr:
            # Contiguous in the tensor and (by construction) in the row: one longer chunk.
            chunks[-1] = Chunk(last.kv_addr, block_stride, last.slot_offset,
                               last.nbytes + chunk_bytes)
        else:
            chunks.append(Chunk(addr, block_stride, offset, chunk_bytes))
    return chunks


def _row_major(sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every index of an array of ``sizes``, last dimension fastest (``[()]`` for no dims)."""
    indices: list[tuple[int, ...]] = [()]
    for size in sizes:
        indices = [index + (i,) for index in indices for i in range(size)]
    return indices


def _largest_pow2_dividing(values: Sequence[int], cap: int) -> int:
    """The largest power of two, at most ``cap``, dividing every value."""
    g = 0
    for v in values:
        g = math.gcd(g, v)
    if g == 0:
        return cap
    return min(cap, g & -g)


class TritonBlockMover:
    """Gathers/scatters whole blocks of all layers of ``kv_caches`` in one kernel launch each.

    ``kv_caches`` are the layer tensors in ``layout.layers`` order (as ``CopyEngine.kv_caches``),
    all on one CUDA device (or on the CPU under ``TRITON_INTERPRET=1``). The mover keeps them
    alive and bakes their addresses into a device table at construction: build a new mover if
    vLLM ever reallocates its KV cache.

    Kernels run on the current torch stream; ordering against other streams is the caller's job.
    Block ids and row ids are not range-checked (that would need a device sync): out-of-range ids
    read or write outside the tensors.

    ``max_programs`` caps the grid (the kernel loops over its jobs): ``None`` launches one program
    per (block, chunk), right for GPU-to-GPU copies. For rows in pinned host memory cap it: the
    link saturates with few programs and an uncapped grid starves kernels running beside it.
    Measured on an H100 (PCIe, Llama-3.1-8B shapes, 32-256 blocks): gather to pinned rows ran at
    52 GB/s with 8 programs or more, scatter from them at 51 GB/s from 16 programs (40 with 8);
    a plain pinned ``copy_`` of the same bytes ran at 55 GB/s. A bf16 GEMM on another stream
    slowed 3.1x beside an uncapped gather, 1.5x with 16 programs, 1.2x with 8.
    """

    def __init__(
        self,
        layout: KVLayout,
        kv_caches: Sequence[torch.Tensor],
        *,
        min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES,
        max_programs: int | None = None,
    ) -> None:
        if len(kv_caches) != len(layout.layers):
            raise ValueError(
                f"tokenvm: {len(kv_caches)} KV tensors for a layout of {len(layout.layers)} layers")
        if not kv_caches:
            raise ValueError("tokenvm: no KV cache tensors")
        device = kv_caches[0].device
        if any(kv.device != device for kv in kv_caches):
            raise ValueError("tokenvm: the KV cache tensors are not all on one device")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"tokenvm: the Triton block mover needs CUDA KV tensors (got {device}); CPU "
                "tensors work only under TRITON_INTERPRET=1")
        if max_programs is not None and max_programs < 1:
            raise ValueError(f"tokenvm: max_programs must be positive, got {max_programs}")
        chunks: list[Chunk] = []
        for layer, kv in zip(layout.layers, kv_caches, strict=True):
            if not 0 <= layer.block_dim < kv.dim():
                raise ValueError(
                    f"tokenvm: layer {layer.name!r}: block_dim {layer.block_dim} out of range for "
                    f"shape {tuple(kv.shape)}")
            nbytes = kv.numel() // max(kv.shape[layer.block_dim], 1) * kv.element_size()
            if nbytes != layer.nbytes:
                raise ValueError(
                    f"tokenvm: layer {layer.name!r}: a block of shape {tuple(kv.shape)} is "
                    f"{nbytes} bytes, the layout says {layer.nbytes}")
            if layer.offset + layer.nbytes > layout.slot_bytes:
                raise ValueError(f"tokenvm: layer {layer.name!r} does not fit in the slot")
            layer_part = layer_chunks(layer.blocks_view(kv), 0, layer.offset)
            small = [c.nbytes for c in layer_part if c.nbytes < min_chunk_bytes]
            if small:
                raise ValueError(
                    f"tokenvm: layer {layer.name!r} (shape {tuple(kv.shape)}, strides "
                    f"{tuple(kv.stride())}, block_dim {layer.block_dim}) splits into "
                    f"{min(small)}-byte contiguous chunks, below min_chunk_bytes="
                    f"{min_chunk_bytes}; use the torch copy engine for this layout")
            chunks.extend(layer_part)
        self.layout = layout
        self.kv_caches = list(kv_caches)  # keeps the tensors (and so the table's addresses) alive
        self.device = device
        self.chunks = tuple(chunks)
        self.max_programs = max_programs
        self.used_bytes = max((c.slot_offset + c.nbytes for c in chunks), default=0)
        """Slot rows must be at least this wide."""
        self._kv_align = _largest_pow2_dividing(
            [v for c in chunks for v in (c.kv_addr, c.block_stride, c.slot_offset, c.nbytes)],
            cap=16)
        max_chunk = max((c.nbytes for c in chunks), default=1)
        self._tile_bytes = min(triton.next_power_of_2(max_chunk), _MAX_TILE_BYTES)
        self._table = torch.tensor(
            [[c.kv_addr, c.block_stride, c.slot_offset, c.nbytes] for c in chunks],
            dtype=torch.int64).reshape(len(chunks), _TABLE_COLS).to(device)

    def gather(
        self, block_ids: torch.Tensor, dst: torch.Tensor, dst_row_ids: torch.Tensor | None = None
    ) -> None:
        """Copy block ``block_ids[i]`` of every layer into row ``dst_row_ids[i]`` (default ``i``).

        ``dst`` is a ``uint8`` matrix with rows of at least ``used_bytes`` and unit column stride,
        on the KV device or (CUDA) pinned host memory. Bytes of a row outside the layers' parts,
        and rows not named, are left untouched.
        """
        self._launch(block_ids, dst, dst_row_ids, to_slots=True)

    def scatter(
        self, src: torch.Tensor, block_ids: torch.Tensor, src_row_ids: torch.Tensor | None = None
    ) -> None:
        """Copy row ``src_row_ids[i]`` (default ``i``) of ``src`` into block ``block_ids[i]``.

        The reverse of ``gather``, with the same requirements on ``src``. Blocks not named are left
        untouched; ``block_ids`` should be distinct (duplicates race: one row wins).
        """
        self._launch(block_ids, src, src_row_ids, to_slots=False)

    def _launch(
        self, block_ids: torch.Tensor, rows: torch.Tensor, row_ids: torch.Tensor | None,
        to_slots: bool,
    ) -> None:
        n = self._check_ids(block_ids, "block_ids")
        if row_ids is not None and self._check_ids(row_ids, "row ids") != n:
            raise ValueError(f"tokenvm: {row_ids.numel()} row ids for {n} block ids")
        self._check_rows(rows, n if row_ids is None else 0)
        num_jobs = n * len(self.chunks)
        if num_jobs == 0:
            return
        slot_base = rows.data_ptr()
        row_stride = rows.stride(0) * rows.element_size()
        align = _largest_pow2_dividing([self._kv_align, slot_base, row_stride], cap=16)
        elem_bytes, elem = next((b, t) for b, t in _ELEMENTS if align % b == 0)
        block = max(self._tile_bytes // elem_bytes, 16)
        # ~32 bytes per thread per iteration: two 16-byte vector accesses in flight per thread.
        num_warps = max(1, min(8, self._tile_bytes // 1024))
        grid = (num_jobs if self.max_programs is None else min(num_jobs, self.max_programs),)
        _copy_chunks_kernel[grid](
            self._table, block_ids, block_ids if row_ids is None else row_ids,
            slot_base, row_stride, len(self.chunks), num_jobs,
            TO_SLOTS=to_slots, HAS_ROW_IDS=row_ids is not None, ELEM=elem,
            ELEM_BYTES=elem_bytes, ALIGN=align, BLOCK=block, num_warps=num_warps,
        )

    def _check_ids(self, ids: torch.Tensor, what: str) -> int:
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise ValueError(
                f"tokenvm: {what} must be a 1-D int64 tensor, got {ids.dtype} {tuple(ids.shape)}")
        if ids.device != self.device:
            raise ValueError(f"tokenvm: {what} are on {ids.device}, the KV cache on {self.device}")
        if ids.numel() > 1 and ids.stride(0) != 1:
            raise ValueError(f"tokenvm: {what} must be contiguous")
        return ids.numel()

    def _check_rows(self, rows: torch.Tensor, min_rows: int) -> None:
        if rows.dtype != torch.uint8 or rows.dim() != 2:
            raise ValueError(
                f"tokenvm: slot rows must be a 2-D uint8 tensor, got {rows.dtype} "
                f"{tuple(rows.shape)}")
        if rows.shape[1] < self.used_bytes or rows.shape[0] < min_rows:
            raise ValueError(
                f"tokenvm: slot rows of shape {tuple(rows.shape)} cannot hold {min_rows} rows of "
                f"{self.used_bytes} bytes")
        if rows.shape[1] > 1 and rows.stride(1) != 1:
            raise ValueError("tokenvm: slot rows must have unit column stride")
        if rows.device != self.device and not (
                self.device.type == "cuda" and rows.device.type == "cpu" and rows.is_pinned()):
            # The kernel dereferences the rows' address on the KV device: that works for memory
            # of that device and, through UVA, for pinned host memory; pageable memory would fault.
            raise ValueError(
                f"tokenvm: slot rows on {rows.device} are not reachable from {self.device} "
                "(use a tensor on that device or pinned host memory)")


def layer_movers(
    layout: KVLayout,
    kv_caches: Sequence[torch.Tensor],
    *,
    min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES,
    max_programs: int | None = None,
) -> list[TritonBlockMover]:
    """One mover per layer (``layout.layers`` order), each moving only its layer's part of a
    slot row: what a layer-wise load launches one after another, with an event after each."""
    return [TritonBlockMover(KVLayout((layer,), layout.slot_bytes), [kv],
                             min_chunk_bytes=min_chunk_bytes, max_programs=max_programs)
            for layer, kv in zip(layout.layers, kv_caches, strict=True)]


def _interpreting() -> bool:
    """Whether the kernel was decorated in interpreter mode (it then runs on CPU tensors)."""
    return not isinstance(_copy_chunks_kernel, triton.runtime.JITFunction)


def gather_blocks(
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    dst: torch.Tensor,
    dst_row_ids: torch.Tensor | None = None,
    *,
    min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES,
    max_programs: int | None = None,
) -> None:
    """``TritonBlockMover(layout, kv_caches, ...).gather(block_ids, dst, dst_row_ids)``.

    Convenience for one-off copies: it rebuilds the address table (a host-to-device copy) each
    call; hold a ``TritonBlockMover`` for repeated use.
    """
    mover = TritonBlockMover(
        layout, kv_caches, min_chunk_bytes=min_chunk_bytes, max_programs=max_programs)
    mover.gather(block_ids, dst, dst_row_ids)


def scatter_blocks(
    src: torch.Tensor,
    src_row_ids: torch.Tensor | None,
    kv_caches: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    *,
    min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES,
    max_programs: int | None = None,
) -> None:
    """``TritonBlockMover(layout, kv_caches, ...).scatter(src, block_ids, src_row_ids)``.

    The reverse of ``gather_blocks``; the same convenience caveat applies.
    """
    mover = TritonBlockMover(
        layout, kv_caches, min_chunk_bytes=min_chunk_bytes, max_programs=max_programs)
    mover.scatter(src, block_ids, src_row_ids)
