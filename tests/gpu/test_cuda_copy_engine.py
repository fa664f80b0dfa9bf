"""CudaCopyEngine on a real GPU: random data, every byte checked, both directions.

Skipped without CUDA (CI has none); ``ci/gpu/run.sh`` runs it on the GPU machine.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NUM_BLOCKS = 96


def make(kind: str, dtype: torch.dtype, layers: int = 4, path: str = "uva",
         staging_blocks: int = 8):
    from tokenvm_vllm.transfer.cuda_copy_engine import CudaCopyEngine
    from tokenvm_vllm.transfer.host_pool import HostPool
    from tokenvm_vllm.transfer.layout import KVLayout

    def layer():
        # randn, not random bytes: NaN payloads would make torch.equal fail on equal bytes
        if kind == "flash":  # (2, blocks, block_size, kv_heads, head_size)
            return torch.randn(2, NUM_BLOCKS, 16, 8, 128, device="cuda").to(dtype)
        if kind == "vllm026":  # what vLLM 0.26 hands a connector on an H100 (see layout.py)
            t = torch.randn(NUM_BLOCKS, 16, 8, 256, device="cuda").to(dtype)
            return t.permute(0, 2, 1, 3)
        # HND stride order, logical flash shape
        t = torch.randn(2, NUM_BLOCKS, 8, 16, 128, device="cuda").to(dtype)
        return t.permute(0, 1, 3, 2, 4)

    caches = {f"l{i}": layer() for i in range(layers)}
    per = caches["l0"].numel() // NUM_BLOCKS * caches["l0"].element_size()
    layout = KVLayout.from_kv_caches(caches, NUM_BLOCKS, per * layers)
    pool = HostPool(48, per * layers, pin=True)
    engine = CudaCopyEngine(layout, caches, pool, path=path,
                            staging_bytes=staging_blocks * pool.slot_bytes)
    return engine, caches, pool


def drain(engine, n):
    results = []
    while len(results) < n:
        results += engine.poll()
    return results


@pytest.mark.parametrize("kind", ["flash", "hnd", "vllm026"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("count", [1, 3, 17, 40])
@pytest.mark.parametrize("path", ["uva", "staged", "staged-runs", "dma"])
def test_round_trip_every_byte(kind, dtype, count, path):
    """``staged`` with 8 staging rows: 17 and 40 blocks take several rounds through them;
    ``staged-runs`` uses consecutive host slots, which DMA moves as merged runs."""
    from tokenvm_vllm.transfer.copy_engine import TorchCopyEngine

    engine, caches, pool = make(kind, dtype, path=path.removesuffix("-runs"))
    gen = torch.Generator().manual_seed(count)
    src = torch.randperm(NUM_BLOCKS, generator=gen)[:count].tolist()
    slots = torch.randperm(pool.num_slots, generator=gen)[:count].tolist()
    if path == "staged-runs":
        slots = list(range(3, 3 + count))[::-1]  # reversed: the engine sorts them into runs
    pool.buffer.fill_(0x5A)
    engine.store(1, src, slots)
    torch.cuda.synchronize()
    (result,) = drain(engine, 1)
    assert result.ok and not result.is_load and result.nbytes == count * pool.slot_bytes
    # the host rows hold exactly what the reference engine writes
    reference = HostPoolLike(pool)
    TorchCopyEngine(engine.layout, caches, reference).store(0, src, slots)
    assert torch.equal(pool.buffer, reference.buffer)
    before = {k: v.clone() for k, v in caches.items()}
    dst = [b for b in range(NUM_BLOCKS) if b not in src][:count]
    engine.load(2, dst, slots)
    torch.cuda.synchronize()
    (result,) = drain(engine, 1)
    assert result.is_load
    for layer in engine.layout.layers:
        kv, old = caches[layer.name], before[layer.name]
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(kv.select(layer.block_dim, d), old.select(layer.block_dim, s))
        others = torch.tensor([b for b in range(NUM_BLOCKS) if b not in dst], device="cuda")
        assert torch.equal(kv.index_select(layer.block_dim, others),
                           old.index_select(layer.block_dim, others))


class HostPoolLike:
    """A plain copy of a pool's buffer, for the reference engine."""

    def __init__(self, pool):
        self.buffer = pool.buffer.clone()
        self.slot_bytes = pool.slot_bytes
        self.num_slots = pool.num_slots

    def ensure_pinned(self, host_slots):
        return  # a plain clone in pageable memory: the reference engine copies synchronously


def test_fence_orders_compute_after_store():
    engine, caches, pool = make("flash", torch.bfloat16)
    kv = caches["l0"]
    want = kv[:, 5].clone()
    engine.store(1, [5], [0])
    engine.fence({1})
    kv[:, 5].zero_()  # queued on the compute stream after the fence: the store saw old bytes
    engine.load(2, [6], [0])
    torch.cuda.synchronize()
    drain(engine, 2)
    assert torch.equal(kv[:, 6], want)


@pytest.mark.parametrize("kind", ["flash", "vllm026"])
def test_layerwise_load_orders_each_layer_after_its_copy(kind):
    engine, caches, pool = make(kind, torch.bfloat16)
    layers = engine.layout.layers
    src, slots, dst = [3, 7, 11, 20, 31], [0, 5, 9, 17, 33], [40, 41, 50, 60, 95]
    engine.store(1, src, slots)
    torch.cuda.synchronize()
    drain(engine, 1)
    before = {k: v.clone() for k, v in caches.items()}
    src_ids, dst_ids = torch.tensor(src, device="cuda"), torch.tensor(dst, device="cuda")
    first = layers[0]
    # A kernel's first launch loads its module, which waits for every stream: warm the read
    # used as the control below, or it would wait for the held-back copy and see new bytes.
    caches[first.name].index_select(first.block_dim, dst_ids)
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    with torch.cuda.stream(engine.load_stream):
        torch.cuda._sleep(200_000_000)  # hold the copy back (~0.1 s) so a missing wait shows
    engine.load_layers(2, dst, slots)
    early = caches[first.name].index_select(first.block_dim, dst_ids)  # read without waiting
    got = []
    for i, layer in enumerate(layers):
        engine.wait_layer({2}, i)
        got.append(caches[layer.name].index_select(layer.block_dim, dst_ids))
    torch.cuda.synchronize()
    # the control: without the wait the forward would have read the blocks' old bytes
    assert torch.equal(early, before[first.name].index_select(first.block_dim, dst_ids))
    for layer, tensor in zip(layers, got, strict=True):
        assert torch.equal(tensor, before[layer.name].index_select(layer.block_dim, src_ids))
    (result,) = drain(engine, 1)
    assert result.is_load and result.ok


@pytest.mark.parametrize("path", ["uva", "staged"])
def test_sync_load_orders_a_replayed_cuda_graph_after_its_copy(path):
    """load_mode="sync": the whole load is queued, then ``fence`` makes the compute stream wait
    for it (no CPU sync); a CUDA graph captured before (as vLLM's FULL graphs are) and replayed
    after the fence reads the loaded bytes."""
    engine, caches, pool = make("flash", torch.bfloat16, path=path)
    layers = engine.layout.layers
    src, slots, dst = [3, 7, 11, 20], [0, 5, 9, 17], [40, 41, 50, 95]
    engine.store(1, src, slots)
    torch.cuda.synchronize()
    drain(engine, 1)
    before = {k: v.clone() for k, v in caches.items()}
    dst_ids = torch.tensor(dst, device="cuda")
    outs = [torch.empty_like(caches[layer.name].index_select(layer.block_dim, dst_ids))
            for layer in layers]

    def forward() -> None:  # reads every layer's loaded blocks into static outputs
        for layer, out in zip(layers, outs, strict=True):
            out.copy_(caches[layer.name].index_select(layer.block_dim, dst_ids))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()  # warm-up before capture (also loads the kernels' modules)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    torch.cuda._sleep(1000)  # (loads the sleep kernel's module before the copy is held)
    torch.cuda.synchronize()
    first = layers[0]
    with torch.cuda.stream(engine.load_stream):
        torch.cuda._sleep(200_000_000)  # hold the copy back (~0.1 s) so a missing wait shows
    engine.load(2, dst, slots)
    early = caches[first.name].index_select(first.block_dim, dst_ids)  # read without waiting
    engine.fence({2})
    graph.replay()
    torch.cuda.synchronize()
    # the control: without the fence the forward would have read the blocks' old bytes
    assert torch.equal(early, before[first.name].index_select(first.block_dim, dst_ids))
    src_ids = torch.tensor(src, device="cuda")
    for layer, out in zip(layers, outs, strict=True):
        assert torch.equal(out, before[layer.name].index_select(layer.block_dim, src_ids))
    (result,) = drain(engine, 1)
    assert result.is_load and result.ok


def test_id_staging_wraps_and_stays_correct():
    """Jobs whose ids wrap round a small staging ring (and one larger than it) copy exactly."""
    from tokenvm_vllm.transfer.cuda_copy_engine import PinnedIdStaging

    engine, caches, pool = make("flash", torch.bfloat16)
    engine._ids = PinnedIdStaging(8)
    layer = engine.layout.layers[0]
    kv = caches[layer.name]
    for round_ in range(6):
        count = 12 if round_ == 5 else 5  # the last job does not fit in the ring
        src = [(round_ * 7 + i * 3) % 40 for i in range(count)]
        slots = list(range(round_, round_ + count))
        dst = [50 + i for i in range(count)]
        want = kv.index_select(layer.block_dim, torch.tensor(src, device="cuda"))
        engine.store(2 * round_, src, slots)
        torch.cuda.synchronize()  # stores and loads run on different streams
        drain(engine, 1)
        engine.load(2 * round_ + 1, dst, slots)
        torch.cuda.synchronize()
        drain(engine, 1)
        got = kv.index_select(layer.block_dim, torch.tensor(dst, device="cuda"))
        assert torch.equal(got, want), round_


@pytest.mark.parametrize("count", [1, 5, 40])
def test_cross_layer_rows_move_by_direct_dma(count):
    """vLLM 0.26's V1 cross-layer cache, registered as one (blocks, slot_bytes) row matrix: the
    staged path DMAs whole rows with no staging buffer; every byte arrives, nothing else moves."""
    from tokenvm_vllm.transfer.cuda_copy_engine import CudaCopyEngine
    from tokenvm_vllm.transfer.host_pool import HostPool
    from tokenvm_vllm.transfer.layout import KVLayout

    slot = 4 * 65536
    rows = torch.randint(0, 256, (NUM_BLOCKS, slot), dtype=torch.uint8, device="cuda")
    caches = {"__cross_layers__": rows}
    layout = KVLayout.from_kv_caches(caches, NUM_BLOCKS, slot)
    pool = HostPool(48, slot, pin=True)
    engine = CudaCopyEngine(layout, caches, pool, path="staged")
    assert engine.direct_rows is not None and engine.staging_rows == 0
    src = list(range(7, 7 + count))  # consecutive blocks and slots: merged runs
    slots = list(range(2, 2 + count))
    engine.store(1, src, slots)
    torch.cuda.synchronize()
    drain(engine, 1)
    assert torch.equal(pool.buffer[slots], rows[src].cpu())
    before = rows.clone()
    dst = [60 - i for i in range(count)]  # reversed: no merging on the GPU side
    engine.load(2, dst, slots)
    torch.cuda.synchronize()
    drain(engine, 1)
    assert torch.equal(rows[dst], before[src])
    others = [b for b in range(NUM_BLOCKS) if b not in dst]
    assert torch.equal(rows[others], before[others])
