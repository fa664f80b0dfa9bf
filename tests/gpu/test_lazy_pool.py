"""The lazily pinned host pool on a real GPU (issue #13 item 4): blocks copied in and out through
the real copy engine, every path, while the background thread is still registering chunks, and
every byte checked. The register call is the real ``cudaHostRegister``, slowed down by a sleep so
that the copies certainly run before the thread reaches their slots.

Skipped without CUDA (CI has none); ``ci/gpu/run.sh tests`` runs it on the GPU machine.
"""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NUM_BLOCKS = 64
NUM_SLOTS = 512
CHUNK = 2 * 2**20


def make(path: str, delay: float = 0.05, chunk_bytes: int = CHUNK, background: bool = True,
         staging_slots: int = 8):
    from tokenvm_vllm.transfer.cuda_copy_engine import CudaCopyEngine
    from tokenvm_vllm.transfer.host_pool import HostPool, _cuda_register, _host_pointer_usable
    from tokenvm_vllm.transfer.layout import KVLayout

    assert _host_pointer_usable(torch.cuda.current_device()), "this GPU would pin eagerly"
    register, unregister = _cuda_register(torch.cuda.current_device())

    def slow_register(address: int, nbytes: int) -> None:
        time.sleep(delay)  # the real call, later: copies overtake the background thread
        register(address, nbytes)

    # (blocks, block_size, kv_heads, head_size) per K and V: 16 x 8 x 128 bf16 = 32 KiB each
    caches = {f"l{i}": torch.randn(2, NUM_BLOCKS, 16, 8, 128, device="cuda").to(torch.bfloat16)
              for i in range(4)}
    per = caches["l0"].numel() // NUM_BLOCKS * caches["l0"].element_size()
    layout = KVLayout.from_kv_caches(caches, NUM_BLOCKS, per * 4)
    pool = HostPool(NUM_SLOTS, per * 4, pin=True, background=False, chunk_bytes=chunk_bytes,
                    register=slow_register, unregister=unregister, duty=1.0)
    engine = CudaCopyEngine(layout, caches, pool, path=path,
                            staging_bytes=staging_slots * pool.slot_bytes)
    if background:
        # After the engine: building it may compile Triton kernels for longer than the
        # background thread needs (the test then saw pinning finish before its first copy).
        pool.start_pinning()
    return engine, caches, pool


def assert_moved(engine, caches, before, src, dst):
    """Every layer's block ``dst[i]`` now holds what block ``src[i]`` held in ``before``."""
    for layer in engine.layout.layers:
        kv, old = caches[layer.name], before[layer.name]
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(kv.select(layer.block_dim, d), old.select(layer.block_dim, s))


def drain(engine, n):
    results = []
    deadline = time.monotonic() + 30
    while len(results) < n and time.monotonic() < deadline:
        results += engine.poll()
    return results


def caches_and_layout():
    """Four bf16 per-layer KV tensors of ``NUM_BLOCKS`` blocks and their layout (a slot holds
    one block of every layer)."""
    from tokenvm_vllm.transfer.layout import KVLayout

    caches = {f"l{i}": torch.randn(2, NUM_BLOCKS, 16, 8, 128, device="cuda").to(torch.bfloat16)
              for i in range(4)}
    per = caches["l0"].numel() // NUM_BLOCKS * caches["l0"].element_size()
    return caches, KVLayout.from_kv_caches(caches, NUM_BLOCKS, per * 4), per * 4


def store_then_load(pool, caches, layout, path):
    """Store blocks 0-23 into the pool's last 24 slots, load them into the last 24 blocks
    through a ``CudaCopyEngine`` on ``path``, and check every byte arrived."""
    from tokenvm_vllm.transfer.cuda_copy_engine import CudaCopyEngine

    engine = CudaCopyEngine(layout, caches, pool, path=path, staging_bytes=8 * pool.slot_bytes)
    src, slots, dst = list(range(0, 24)), list(range(NUM_SLOTS - 24, NUM_SLOTS)), list(
        range(NUM_BLOCKS - 24, NUM_BLOCKS))
    engine.store(1, src, slots)
    torch.cuda.synchronize()
    (stored,) = drain(engine, 1)
    assert stored.ok
    before = {name: cache.clone() for name, cache in caches.items()}
    engine.load(2, dst, slots)
    torch.cuda.synchronize()
    (loaded,) = drain(engine, 1)
    assert loaded.ok and loaded.is_load
    assert_moved(engine, caches, before, src, dst)


@pytest.mark.parametrize("path", ["uva", "staged", "layerwise", "dma"])
def test_copies_overtake_background_pinning_and_every_byte_arrives(path):
    engine, caches, pool = make("uva" if path == "layerwise" else path)
    pinner = pool.pinner
    assert pinner is not None and pinner.num_chunks == -(-NUM_SLOTS * pool.slot_bytes // CHUNK)
    gen = torch.Generator().manual_seed(7)
    src = torch.randperm(NUM_BLOCKS, generator=gen)[:20].tolist()
    # slots near the end of the pool: chunks the background thread reaches last
    slots = (NUM_SLOTS - 1 - torch.randperm(NUM_SLOTS // 4, generator=gen)[:20]).tolist()
    engine.store(1, src, slots)
    assert not pinner.done.is_set(), "background pinning finished before the copy: too fast"
    assert all(pool.buffer[s].is_pinned() for s in slots)
    torch.cuda.synchronize()
    (stored,) = drain(engine, 1)
    assert stored.ok
    before = {k: v.clone() for k, v in caches.items()}
    dst = [b for b in range(NUM_BLOCKS) if b not in src][:20]
    if path == "layerwise":
        engine.load_layers(2, dst, slots)
    else:
        engine.load(2, dst, slots)
    torch.cuda.synchronize()
    (loaded,) = drain(engine, 1)
    assert loaded.ok and loaded.is_load
    assert_moved(engine, caches, before, src, dst)
    assert pinner.on_demand_chunks >= 1
    assert pool.wait_pinned(timeout=120) and pinner.error is None
    assert pinner.registered_chunks == pinner.num_chunks
    assert pinner.background_chunks + pinner.on_demand_chunks == pinner.num_chunks
    assert pool.buffer[0].is_pinned() and pool.buffer[NUM_SLOTS - 1].is_pinned()
    pool.close()
    assert not pool.buffer[NUM_SLOTS - 1].is_pinned()  # unregistered


def test_real_pool_pins_lazily_in_the_background():
    from tokenvm_vllm.transfer.host_pool import HostPool

    pool = HostPool(256, 2**20, pin=True)  # 256 MiB, the real CUDA calls, default chunks
    assert pool.pinner is not None and pool.alloc_seconds < 0.5
    assert pool.wait_pinned(timeout=60) and pool.pinner.error is None
    assert pool.buffer[255].is_pinned()
    pool.buffer[255].fill_(3)
    gpu = pool.buffer[255].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert int(gpu.sum()) == 3 * 2**20
    pool.close()


@pytest.mark.parametrize("path", ["staged", "dma"])
def test_an_eager_pool_is_registered_when_built_and_copies_by_dma(path):
    """``pin_mode: eager``: the pool is registered in chunks before the constructor returns
    (the real CUDA calls), and the copy engine moves blocks through it."""
    from tokenvm_vllm.transfer.host_pool import HostPool

    caches, layout, slot_bytes = caches_and_layout()
    pool = HostPool(NUM_SLOTS, slot_bytes, pin=True, lazy=False, chunk_bytes=CHUNK)
    assert pool.pinner is not None
    assert pool.pinner.registered_chunks == pool.pinner.num_chunks
    assert pool.buffer[NUM_SLOTS - 1].is_pinned()
    store_then_load(pool, caches, layout, path)
    assert pool.pinner.on_demand_chunks == pool.pinner.num_chunks  # all at construction
    pool.close()
    assert not pool.buffer[NUM_SLOTS - 1].is_pinned()


@pytest.mark.parametrize("path", ["staged", "dma"])
@pytest.mark.parametrize("chunk_pages", [64, 96])
def test_consecutive_slots_across_registration_chunks_move_by_dma(chunk_pages, path):
    """A store of consecutive slots is one DMA run; with the pool registered in chunks it must be
    cut at each chunk (cuMemcpyBatchAsync refuses a copy spanning two registrations: seen on
    the H200 as 'cuMemcpyBatchAsync failed at index 0 with error 1' in a serving run).
    Slots are 256 KiB: 64 pages is one slot per chunk, 96 pages one and a half (cuts fall
    inside rows)."""
    import mmap

    engine, caches, pool = make(path, delay=0.0, chunk_bytes=chunk_pages * mmap.PAGESIZE,
                                background=False, staging_slots=48)
    src = list(range(5, 45))
    slots = list(range(100, 140))  # one run of 40 consecutive slots
    engine.store(1, src, slots)
    torch.cuda.synchronize()
    (stored,) = drain(engine, 1)
    assert stored.ok
    before = {k: v.clone() for k, v in caches.items()}
    dst = list(range(NUM_BLOCKS - 40, NUM_BLOCKS))
    engine.load(2, dst, slots)
    torch.cuda.synchronize()
    (loaded,) = drain(engine, 1)
    assert loaded.ok
    assert_moved(engine, caches, before, src, dst)
    pool.close()


def test_a_cuda_graph_captures_while_registration_is_paused():
    """``pin_mode: overlap``: the pool registers on a thread during vLLM's warm-up, paused
    around its CUDA graph capture (CUDA's global capture mode fails on a registration from
    another thread); the capture succeeds and the thread then finishes the pool."""
    from tokenvm_vllm.transfer.host_pool import HostPool, _cuda_register

    register, unregister = _cuda_register(torch.cuda.current_device())

    def slow_register(address: int, nbytes: int) -> None:
        time.sleep(0.01)  # the thread is certainly still registering at the capture
        register(address, nbytes)

    pool = HostPool(512, 2**20, pin=True, background=False, duty=1.0, chunk_bytes=CHUNK,
                    register=slow_register, unregister=unregister)
    pinner = pool.pinner
    assert pinner is not None
    x = torch.ones(1024, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = x * 2  # warm-up outside the capture, as torch asks
    torch.cuda.current_stream().wait_stream(side)
    pool.start_pinning()
    time.sleep(0.05)
    pinner.pause()
    try:
        held = pinner.registered_chunks
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = x * 2
        assert pinner.registered_chunks == held  # nothing registered during the capture
    finally:
        pinner.resume()
    assert 0 < held < pinner.num_chunks
    x.fill_(3)
    graph.replay()
    torch.cuda.synchronize()
    assert int(y.sum().item()) == 6 * 1024
    assert pool.wait_pinned(timeout=60) and pinner.error is None
    assert pinner.registered_chunks == pinner.num_chunks
    pool.close()


def test_a_pool_adopts_the_registration_started_at_the_model_load():
    """``pin_mode: overlap`` from the model load on (``connector/early_pool.py``): memory
    registered on a thread with the real CUDA calls before the pool exists; the pool built
    later (smaller than the registration, as a pool of whole slots is) takes it over, copies
    run by DMA while the thread may still be registering, and ``close`` unregisters it all."""
    from tokenvm_vllm.transfer import host_pool
    from tokenvm_vllm.transfer.host_pool import HostPool

    caches, layout, slot_bytes = caches_and_layout()
    device = torch.cuda.current_device()
    early = host_pool.start_early_registration(NUM_SLOTS * slot_bytes + 12345, device,
                                               chunk_bytes=CHUNK)
    taken = host_pool.take_early_registration(NUM_SLOTS * slot_bytes, device)
    assert taken is early
    pool = HostPool(NUM_SLOTS, slot_bytes, pin=True, background=False, early=taken)
    assert pool.pinner is early.pinner and pool.buffer.data_ptr() == early.pinner.address
    store_then_load(pool, caches, layout, "dma")
    assert pool.wait_pinned(timeout=60) and early.pinner.error is None
    assert early.pinner.registered_chunks == early.pinner.num_chunks
    assert pool.buffer[NUM_SLOTS - 1].is_pinned()
    pool.close()
    assert not pool.buffer[NUM_SLOTS - 1].is_pinned()
