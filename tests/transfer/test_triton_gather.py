"""Triton block mover: byte-for-byte the slot layout of ``TorchCopyEngine``, and a lossless reverse.

Runs the kernels in Triton's interpreter on CPU tensors. ``triton.jit`` picks the interpreter when
the kernel is decorated (at import), so ``TRITON_INTERPRET=1`` is set around the import here (and
the module re-imported if something imported it earlier without it), then set again only while
this module's tests run, so that other tests in the same session see the environment unchanged.
"""

import importlib
import os
import sys

import pytest
import torch

_MODULE = "tokenvm_vllm.transfer.triton_gather"
_saved_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    triton_gather = importlib.import_module(_MODULE)
    if not triton_gather._interpreting():
        triton_gather = importlib.reload(sys.modules[_MODULE])
finally:
    if _saved_interpret is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved_interpret

from tokenvm_vllm.transfer.copy_engine import TorchCopyEngine  # noqa: E402
from tokenvm_vllm.transfer.host_pool import HostPool  # noqa: E402
from tokenvm_vllm.transfer.layout import KVLayout  # noqa: E402

TritonBlockMover = triton_gather.TritonBlockMover

pytestmark = pytest.mark.skipif(
    not triton_gather._interpreting(),
    reason="the Triton interpreter could not be enabled for the kernel (TRITON_INTERPRET=1)")

NUM_BLOCKS = 23
NUM_LAYERS = 3
PAD = 24  # slot bytes after the last layer's part: must stay untouched


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def random_bytes_(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fill a contiguous tensor with random bit patterns (NaNs included: the copy is bitwise)."""
    raw = t.view(torch.uint8).view(-1)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
    return t


def layer_tensor(kind: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A layer's KV tensor in logical vLLM order; the physical order depends on ``kind``."""
    nb = NUM_BLOCKS
    if kind == "flash":  # (2, blocks, block_size, heads, head), contiguous: K and V chunks
        return random_bytes_(torch.empty(2, nb, 4, 2, 8, dtype=dtype), gen)
    if kind == "blocks_first":  # (blocks, 2, heads, block_size, head): one chunk per block
        return random_bytes_(torch.empty(nb, 2, 2, 4, 8, dtype=dtype), gen)
    if kind == "blocks_outer":  # logical (2, blocks, ...), physical (blocks, 2, ...): merged chunk
        return random_bytes_(torch.empty(nb, 2, 4, 2, 8, dtype=dtype), gen).transpose(0, 1)
    if kind == "offset":  # a view with a storage offset, flash layout, two-dim trailing part
        return random_bytes_(torch.empty(2, nb + 1, 4, 16, dtype=dtype), gen)[:, 1:]
    if kind == "hnd":  # logical (2, blocks, block_size, heads, head), physical heads-before-tokens
        return random_bytes_(torch.empty(2, nb, 2, 2, 8, dtype=dtype), gen).permute(0, 1, 3, 2, 4)
    if kind == "odd":  # 30-byte chunks in fp16: only 2-byte alignment, narrow elements
        return random_bytes_(torch.empty(2, nb, 3, 1, 5, dtype=dtype), gen)
    raise AssertionError(kind)


def make_caches(
    kind: str, dtype: torch.dtype, seed: int
) -> tuple[dict[str, torch.Tensor], KVLayout]:
    gen = torch.Generator().manual_seed(seed)
    caches = {f"layer.{i}": layer_tensor(kind, dtype, gen) for i in range(NUM_LAYERS)}
    per_layer = caches["layer.0"].numel() // NUM_BLOCKS * caches["layer.0"].element_size()
    layout = KVLayout.from_kv_caches(caches, NUM_BLOCKS, per_layer * NUM_LAYERS + PAD)
    return caches, layout


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """Same-size integer view, so comparisons are bitwise (NaN == NaN)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def mover_for(layout: KVLayout, caches: dict[str, torch.Tensor], **kw):
    kw.setdefault("min_chunk_bytes", 1)  # test tensors are tiny: small chunks are only slow
    return TritonBlockMover(layout, [caches[layer.name] for layer in layout.layers], **kw)


KINDS = ["flash", "blocks_first", "blocks_outer", "offset", "hnd", "odd"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 17])
def test_gather_matches_torch_engine_and_scatter_restores(kind, dtype, n):
    caches, layout = make_caches(kind, dtype, seed=n)
    mover = mover_for(layout, caches)
    gen = torch.Generator().manual_seed(100 + n)
    num_rows = n + 5
    block_ids = torch.randperm(NUM_BLOCKS, generator=gen)[:n]
    row_ids = torch.randperm(num_rows, generator=gen)[:n]

    # Gather into arbitrary rows of a matrix full of junk; the torch engine stores the same
    # blocks into a pool holding the same junk: the two must agree on every byte.
    rows = torch.randint(0, 256, (num_rows, layout.slot_bytes), dtype=torch.uint8, generator=gen)
    pool = HostPool(num_rows, layout.slot_bytes, pin=False)
    pool.buffer.copy_(rows)
    TorchCopyEngine(layout, caches, pool).store(0, block_ids.tolist(), row_ids.tolist())
    mover.gather(block_ids, rows, row_ids)
    assert torch.equal(rows, pool.buffer)

    # Scatter those rows into other blocks of the same caches: each target block becomes a
    # bitwise copy of its source block; every other block keeps its bytes.
    before = {name: kv.clone() for name, kv in caches.items()}
    targets = torch.randperm(NUM_BLOCKS, generator=gen)[:n]
    mover.scatter(rows, targets, row_ids)
    for layer in layout.layers:
        kv, old = as_bits(caches[layer.name]), as_bits(before[layer.name])
        source_of = dict(zip(targets.tolist(), block_ids.tolist(), strict=True))
        for b in range(NUM_BLOCKS):
            expected = old.select(layer.block_dim, source_of.get(b, b))
            assert torch.equal(kv.select(layer.block_dim, b), expected), (layer.name, b)


@pytest.mark.parametrize("kind", ["flash", "hnd"])
def test_default_rows_and_capped_grid(kind):
    """Without row ids, rows are 0..N-1; a grid smaller than the job count still does every job."""
    caches, layout = make_caches(kind, torch.bfloat16, seed=7)
    gen = torch.Generator().manual_seed(8)
    block_ids = torch.randperm(NUM_BLOCKS, generator=gen)[:5]
    for max_programs in (None, 1, 3):
        mover = mover_for(layout, caches, max_programs=max_programs)
        rows = torch.zeros(5, layout.slot_bytes, dtype=torch.uint8)
        mover.gather(block_ids, rows)
        pool = HostPool(5, layout.slot_bytes, pin=False)
        pool.buffer.zero_()
        TorchCopyEngine(layout, caches, pool).store(0, block_ids.tolist(), list(range(5)))
        assert torch.equal(rows, pool.buffer), max_programs

        wiped = {name: torch.zeros_like(kv) for name, kv in caches.items()}
        other = mover_for(layout, wiped, max_programs=max_programs)
        other.scatter(rows, block_ids)
        for layer in layout.layers:
            got = as_bits(wiped[layer.name]).index_select(layer.block_dim, block_ids)
            want = as_bits(caches[layer.name]).index_select(layer.block_dim, block_ids)
            assert torch.equal(got, want)
            untouched = [b for b in range(NUM_BLOCKS) if b not in block_ids.tolist()]
            rest = wiped[layer.name].index_select(layer.block_dim, torch.tensor(untouched))
            assert not as_bits(rest).any()


def test_module_functions_round_trip():
    caches, layout = make_caches("flash", torch.float16, seed=3)
    kvs = [caches[layer.name] for layer in layout.layers]
    before = [as_bits(kv).clone() for kv in kvs]
    ids = torch.tensor([4, 0, 19])
    rows = torch.zeros(8, layout.slot_bytes, dtype=torch.uint8)
    row_ids = torch.tensor([6, 1, 3])
    triton_gather.gather_blocks(kvs, layout, ids, rows, row_ids, min_chunk_bytes=1)
    for kv in kvs:
        kv.zero_()
    triton_gather.scatter_blocks(rows, row_ids, kvs, layout, ids, min_chunk_bytes=1)
    for kv, old, layer in zip(kvs, before, layout.layers, strict=True):
        for b in range(NUM_BLOCKS):
            want = old.select(layer.block_dim, b) if b in ids.tolist() else 0
            assert torch.equal(as_bits(kv).select(layer.block_dim, b),
                               torch.zeros_like(old.select(layer.block_dim, b)) + want)


def test_chunks_describe_the_layout():
    caches, layout = make_caches("flash", torch.bfloat16, seed=0)
    mover = mover_for(layout, caches)
    assert len(mover.chunks) == 2 * NUM_LAYERS  # K and V of each layer
    assert all(c.nbytes == 4 * 2 * 8 * 2 for c in mover.chunks)
    caches, layout = make_caches("blocks_outer", torch.bfloat16, seed=0)
    assert len(mover_for(layout, caches).chunks) == NUM_LAYERS  # K, V merged


def test_refuses_fragmented_layout():
    caches, layout = make_caches("hnd", torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match="min_chunk_bytes"):
        TritonBlockMover(layout, [caches[layer.name] for layer in layout.layers])


def test_refuses_bad_arguments():
    caches, layout = make_caches("flash", torch.float32, seed=0)
    kvs = [caches[layer.name] for layer in layout.layers]
    with pytest.raises(ValueError, match="layout of 3 layers"):
        TritonBlockMover(layout, kvs[:2])
    mover = TritonBlockMover(layout, kvs, min_chunk_bytes=1)
    rows = torch.zeros(4, layout.slot_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="int64"):
        mover.gather(torch.tensor([1, 2], dtype=torch.int32), rows)
    with pytest.raises(ValueError, match="cannot hold"):
        mover.gather(torch.tensor([1, 2]), rows[:, :-PAD - 1])
    with pytest.raises(ValueError, match="cannot hold"):
        mover.gather(torch.arange(5), rows)
    with pytest.raises(ValueError, match="row ids"):
        mover.scatter(rows, torch.tensor([1, 2]), torch.tensor([0]))
    with pytest.raises(ValueError, match="uint8"):
        mover.gather(torch.tensor([1]), rows.view(torch.int32))


@pytest.mark.parametrize("kind", ["flash", "blocks_outer"])
def test_layer_movers_each_move_one_layer(kind):
    """A layer-wise load: layer i's mover writes layer i only; all of them = one full scatter."""
    caches, layout = make_caches(kind, torch.bfloat16, seed=11)
    kvs = [caches[layer.name] for layer in layout.layers]
    block_ids, targets = torch.tensor([2, 9, 14]), torch.tensor([20, 0, 5])
    rows = torch.zeros(3, layout.slot_bytes, dtype=torch.uint8)
    mover_for(layout, caches).gather(block_ids, rows)
    before = [as_bits(kv).clone() for kv in kvs]
    movers = triton_gather.layer_movers(layout, kvs, min_chunk_bytes=1)
    assert len(movers) == NUM_LAYERS
    for i, mover in enumerate(movers):
        mover.scatter(rows, targets)
        for j, (kv, old, layer) in enumerate(zip(kvs, before, layout.layers, strict=True)):
            got = as_bits(kv).index_select(layer.block_dim, targets)
            source = block_ids if j <= i else targets  # later layers not written yet
            assert torch.equal(got, old.index_select(layer.block_dim, source)), (i, j)


def memmove_all(src: torch.Tensor, dst: torch.Tensor, sizes: torch.Tensor) -> None:
    """What ``swap_blocks_batch`` does on the GPU, on CPU addresses: copy every span."""
    import ctypes

    for s, d, n in zip(src.tolist(), dst.tolist(), sizes.tolist(), strict=True):
        ctypes.memmove(d, s, n)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", [0, 64, 100])
def test_dma_chunk_copies_store_and_load_every_byte(kind, split):
    """``copy_path: dma``'s pointer table (``dma.chunk_copies``), executed with memmove: the
    rows it writes equal ``TorchCopyEngine``'s slot layout byte for byte, and the reverse
    restores blocks. ``split``: host registrations that copies must not cross (100 bytes: cuts
    inside chunks and rows)."""
    from tokenvm_vllm.transfer.dma import chunk_copies

    caches, layout = make_caches(kind, torch.float16, seed=7)
    mover = mover_for(layout, caches)
    gen = torch.Generator().manual_seed(3)
    n, num_rows = 9, 14
    block_ids = torch.randperm(NUM_BLOCKS, generator=gen)[:n].tolist()
    slots = torch.randperm(num_rows, generator=gen)[:n].tolist()
    junk = torch.randint(0, 256, (num_rows, layout.slot_bytes), dtype=torch.uint8, generator=gen)
    reference = HostPool(num_rows, layout.slot_bytes, pin=False)
    reference.buffer.copy_(junk)
    TorchCopyEngine(layout, caches, reference).store(0, block_ids, slots)
    rows = junk.clone()
    kv_ptrs, host_ptrs, sizes = chunk_copies(mover.chunks, block_ids, slots, layout.slot_bytes,
                                             rows.data_ptr(), split)
    if split:
        offsets = host_ptrs - rows.data_ptr()
        assert bool((offsets // split == (offsets + sizes - 1) // split).all())
    memmove_all(kv_ptrs, host_ptrs, sizes)
    assert torch.equal(rows, reference.buffer)
    before = {name: kv.clone() for name, kv in caches.items()}
    targets = [b for b in range(NUM_BLOCKS) if b not in block_ids][:n]
    kv_ptrs, host_ptrs, sizes = chunk_copies(mover.chunks, targets, slots, layout.slot_bytes,
                                             rows.data_ptr(), split)
    memmove_all(host_ptrs, kv_ptrs, sizes)
    for layer in layout.layers:
        kv, old = as_bits(caches[layer.name]), as_bits(before[layer.name])
        source_of = dict(zip(targets, block_ids, strict=True))
        for b in range(NUM_BLOCKS):
            expected = old.select(layer.block_dim, source_of.get(b, b))
            assert torch.equal(kv.select(layer.block_dim, b), expected), (layer.name, b)
