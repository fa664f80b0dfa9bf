"""Elastic settings: validated with one-line errors; the layout read from vLLM's KV tensors;
elastic mode refused on CUDA."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)

from tokenvm_vllm import compat
from tokenvm_vllm.config import TokenVMConfigError, load_config
from tokenvm_vllm.elastic import pool as elastic_pool
from tokenvm_vllm.elastic.pool import check_platform, layout_for


def test_defaults_are_off():
    config = load_config({}, environ={})
    assert config.elastic is False
    assert config.gpu_kv_ceiling_bytes == 0 and config.gpu_kv_floor_bytes == 0
    assert config.elastic_page_bytes == 2 << 20
    assert config.elastic_keep_cache is True
    assert load_config({"elastic": True}, environ={"TOKENVM_ELASTIC_KEEP_CACHE": "false"}
                       ).elastic_keep_cache is False


def test_sizes_and_idle_parse():
    config = load_config({"elastic": "true", "gpu_kv_floor_bytes": "1GiB",
                          "gpu_kv_ceiling_bytes": "8GiB", "shrink_idle_s": "5"}, environ={})
    assert config.gpu_kv_floor_bytes == 2**30 and config.gpu_kv_ceiling_bytes == 8 * 2**30
    assert config.shrink_idle_s == 5.0


@pytest.mark.parametrize(("extra", "words"), [
    ({"gpu_kv_floor_bytes": "1GiB"}, ["gpu_kv_floor_bytes=1073741824", "elastic is off"]),
    ({"gpu_kv_ceiling_bytes": "1GiB"}, ["gpu_kv_ceiling_bytes", "elastic=true"]),
    ({"elastic_ceiling_file": "/tmp/c"}, ["elastic_ceiling_file='/tmp/c'", "elastic is off"]),
    ({"gpu_free_target_bytes": "1GiB"}, ["gpu_free_target_bytes=1073741824", "elastic is off"]),
    ({"elastic": True, "gpu_kv_floor_bytes": "2GiB", "gpu_kv_ceiling_bytes": "1GiB"},
     ["gpu_kv_ceiling_bytes=1073741824", "below gpu_kv_floor_bytes=2147483648"]),
    ({"elastic": True, "shrink_idle_s": 0}, ["shrink_idle_s=0.0", "between 0"]),
    ({"elastic": True, "elastic_page_bytes": 0}, ["elastic_page_bytes=0", "> 0"]),
    ({"elastic": "maybe"}, ["elastic='maybe'", "boolean"]),
])
def test_bad_values_give_one_line_naming_the_key(extra, words):
    with pytest.raises(TokenVMConfigError) as err:
        load_config(extra, environ={})
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_refused_on_cuda_only_where_the_hook_is_not_written(monkeypatch):
    from vllm.platforms import current_platform

    check_platform(True)  # this CPU machine: accepted
    check_platform(False)
    platform = type(current_platform)
    monkeypatch.setattr(platform, "is_cuda_alike", lambda self: True)
    monkeypatch.setattr(platform, "is_cuda", lambda self: True)
    check_platform(False)  # off: nothing to refuse
    # CUDA with vLLM 0.32 (this machine's release): the allocation hook is for 0.26 only
    with pytest.raises(TokenVMConfigError, match=r"needs vLLM 0\.26\.0 .* this is vLLM 0\.32"):
        check_platform(True)
    with pytest.raises(TokenVMConfigError, match=r"needs vLLM 0\.26\.0"):
        compat.install_elastic_kv_hook(lambda config, device: None)
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.26.0")
    check_platform(True)  # the release the hook is written for (eager and graphs: H200)
    monkeypatch.setattr(platform, "is_cuda", lambda self: False)  # ROCm: no CUDA VMM
    with pytest.raises(TokenVMConfigError, match="not CUDA"):
        check_platform(True)


def _config(tensors: list[KVCacheTensor], layers: list[str]) -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)
    return KVCacheConfig(num_blocks=100, kv_cache_tensors=tensors,
                         kv_cache_groups=[KVCacheGroupSpec(layers, spec)])


def test_layer_outer_cache_is_one_region_per_layer():
    page = 2 * 2 * 16 * 64 * 4  # K,V x heads x tokens x head size x float32
    layers = ["l0", "l1", "l2"]
    tensor = KVCacheTensor(size=3 * 100 * page, layers=layers, layer_stride=100 * page,
                           block_stride=page)
    assert compat.kv_cache_block_regions(_config([tensor], layers)) == [page] * 3
    layout = layout_for(_config([tensor], layers), page_bytes=4 * page)
    assert layout.num_groups == 25 and layout.group_bytes(0) == 3 * 4 * page
    assert layout.groups_of_block(5) == (1,)


def test_block_outer_cache_is_one_region():
    page = 2 * 2 * 16 * 64 * 4
    layers = ["l0", "l1", "l2"]
    tensor = KVCacheTensor(size=3 * 100 * page, layers=layers, layer_stride=page,
                           block_stride=3 * page)
    assert compat.kv_cache_block_regions(_config([tensor], layers)) == [3 * page]


def test_no_tensors_falls_back_to_per_layer_blocks():
    layout = elastic_pool.layout_for(_config([], ["l0", "l1"]), page_bytes=2 << 20)
    assert layout.block_bytes == (2 * 2 * 16 * 64 * 4,) * 2
