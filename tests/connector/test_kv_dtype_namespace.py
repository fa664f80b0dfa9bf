"""Issue #14 item 3: fp8 and bf16 (and e4m3 and e5m2) KV caches never share a namespace.

vLLM allocates every fp8 KV cache as a ``torch.uint8`` tensor, so the namespace's ``kv_dtype``
must come from vLLM's ``cache_dtype`` setting too: with the tensor dtype alone an e5m2 disk or
remote store would serve its bytes to an e4m3 engine of the same shape. The worker here is
TokenVM's real one, built from vLLM's real engine config for each ``kv_cache_dtype``.
"""

from __future__ import annotations

import pytest
import torch
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

from tokenvm_vllm.config import load_config
from tokenvm_vllm.connector.worker import TokenVMWorker
from tokenvm_vllm.keys import Namespace, kv_dtype_name

BLOCKS, BLOCK_SIZE, HEAD_SIZE = 8, 16, 8


def worker_namespace(model_dir: str, cache_dtype: str) -> Namespace:
    """The namespace of a worker whose engine was configured with ``kv_cache_dtype``."""
    vllm_config = EngineArgs(model=model_dir, dtype="float32", block_size=BLOCK_SIZE,
                             kv_cache_dtype=cache_dtype).create_engine_config()
    dtype = torch.uint8 if cache_dtype.startswith("fp8") else torch.float32  # as vLLM does
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=1, head_size=HEAD_SIZE,
                             dtype=dtype)
    kv_cache_config = KVCacheConfig(num_blocks=BLOCKS, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    worker = TokenVMWorker(vllm_config, kv_cache_config,
                           load_config({"host_bytes": "1MiB"}, environ={}))
    worker.register_kv_caches(
        {"layer.0": torch.zeros(BLOCKS, 1, BLOCK_SIZE, 2 * HEAD_SIZE, dtype=dtype)})
    return worker.namespace(str(dtype))


def test_fp8_variants_and_float_caches_get_distinct_namespaces(tiny_model_config: str) -> None:
    names = {d: worker_namespace(tiny_model_config, d)
             for d in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")}
    assert names["fp8_e5m2"].kv_dtype == "fp8_e5m2/torch.uint8"
    assert names["auto"].kv_dtype == "auto/torch.float32"
    # e4m3 and e5m2 blocks are the same size and layout: only the dtype name tells them apart
    assert names["fp8_e4m3"].layout == names["fp8_e5m2"].layout
    fingerprints = {d: ns.fingerprint() for d, ns in names.items()}
    assert len(set(fingerprints.values())) == len(fingerprints), fingerprints
    # stable across workers (a restart finds its own disk slots)
    assert worker_namespace(tiny_model_config, "fp8_e5m2").fingerprint() == \
        fingerprints["fp8_e5m2"]


@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e5m2", "int8_per_token_head"])
def test_dynamic_scales_tie_quantized_bytes_to_this_process(cache_dtype: str) -> None:
    """vLLM 0.26's ``calculate_kv_scales`` derives the fp8 scales from an engine's first batch:
    another process's bytes are not reusable, so the name carries a per-process nonce."""
    static = kv_dtype_name(cache_dtype, "torch.uint8")
    dynamic = kv_dtype_name(cache_dtype, "torch.uint8", dynamic_scales=True)
    assert dynamic != static and dynamic.startswith(static + "/dynamic-scales-")
    assert kv_dtype_name("auto", "torch.bfloat16", dynamic_scales=True) == "auto/torch.bfloat16"
