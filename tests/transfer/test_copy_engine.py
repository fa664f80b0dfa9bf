"""TorchCopyEngine: every byte of every layer round-trips, for several KV layouts and dtypes."""

import pytest
import torch

from tokenvm_vllm.transfer.copy_engine import TorchCopyEngine
from tokenvm_vllm.transfer.host_pool import HostPool, num_host_slots
from tokenvm_vllm.transfer.layout import KVLayout

NUM_BLOCKS = 11


def layer_tensor(kind: str, dtype: torch.dtype) -> torch.Tensor:
    if kind == "flash":  # (2, blocks, block_size, heads, head)
        t = torch.randn(2, NUM_BLOCKS, 4, 2, 8)
    elif kind == "blocks_first":  # (blocks, 2, heads, block_size, head)
        t = torch.randn(NUM_BLOCKS, 2, 2, 4, 8)
    else:  # HND stride order: logical (2, blocks, block_size, heads, head), physically permuted
        t = torch.randn(2, NUM_BLOCKS, 2, 4, 8).permute(0, 1, 3, 2, 4)
    return t.to(dtype)


def make_engine(kind, dtype, num_layers=3):
    caches = {f"layer.{i}": layer_tensor(kind, dtype) for i in range(num_layers)}
    per_layer = caches["layer.0"].numel() // NUM_BLOCKS * caches["layer.0"].element_size()
    slot_bytes = per_layer * num_layers
    layout = KVLayout.from_kv_caches(caches, NUM_BLOCKS, slot_bytes)
    pool = HostPool(num_host_slots(8 * slot_bytes, slot_bytes), slot_bytes, pin=False)
    return TorchCopyEngine(layout, caches, pool), caches, pool


@pytest.mark.parametrize("kind", ["flash", "blocks_first", "permuted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_then_load_restores_every_byte(kind, dtype):
    engine, caches, pool = make_engine(kind, dtype)
    original = {k: v.clone() for k, v in caches.items()}
    src, slots = [7, 2, 9], [5, 0, 3]
    engine.store(1, src, slots)
    assert [r.job_id for r in engine.poll()] == [1]
    dst = [4, 1, 10]
    engine.load(2, dst, slots)
    (result,) = engine.poll()
    assert result.is_load and result.ok and result.nbytes == 3 * pool.slot_bytes
    for name, kv in caches.items():
        layer = next(layer for layer in engine.layout.layers if layer.name == name)
        for s, d in zip(src, dst, strict=True):
            want = original[name].select(layer.block_dim, s)
            assert torch.equal(kv.select(layer.block_dim, d), want)
        untouched = [b for b in range(NUM_BLOCKS) if b not in dst]
        for b in untouched:
            want = original[name].select(layer.block_dim, b)
            assert torch.equal(kv.select(layer.block_dim, b), want)


def test_store_writes_only_its_slots():
    engine, _, pool = make_engine("flash", torch.float32)
    pool.buffer.fill_(0xAB)
    engine.store(0, [1], [2])
    for slot in range(pool.num_slots):
        touched = not torch.all(pool.buffer[slot] == 0xAB)
        assert touched == (slot == 2)


def test_layout_refuses_ambiguous_block_dim():
    caches = {"x": torch.zeros(4, 4, 8)}
    with pytest.raises(ValueError, match="block dimension"):
        KVLayout.from_kv_caches(caches, 4, 10**6)


def test_layout_refuses_slot_too_small():
    caches = {"x": torch.zeros(2, 5, 8)}
    with pytest.raises(ValueError, match="slot"):
        KVLayout.from_kv_caches(caches, 5, 8)


def test_host_pool_too_small_is_an_error():
    with pytest.raises(ValueError, match="host_bytes"):
        num_host_slots(100, 4096)


def test_lagging_copies_run_at_the_next_poll_and_report_at_the_one_after():
    """``lag`` (``debug_lag_copies``): a load lands at the first poll after its call and is
    returned by the second, like a CUDA copy beside a step's forward; a fence runs it at once."""
    engine, caches, _ = make_engine("blocks_first", torch.float32)
    engine.store(1, [3], [0])
    engine.poll()
    engine.lag = True
    before = caches["layer.0"][5].clone()
    engine.load(2, [5], [0])
    assert torch.equal(caches["layer.0"][5], before)  # not copied yet
    assert engine.poll() == []  # runs the copy
    assert torch.equal(caches["layer.0"][5], caches["layer.0"][3])
    assert [r.job_id for r in engine.poll()] == [2]
    engine.load(3, [6], [0])
    engine.fence({3})  # a forward about to write there: now
    assert torch.equal(caches["layer.0"][6], caches["layer.0"][3])
    assert [r.job_id for r in engine.poll()] == [3] and engine.poll() == []
