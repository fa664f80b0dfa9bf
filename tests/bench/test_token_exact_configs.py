"""The GPU token-exact script's configurations (``ci/gpu/token_exact.py``), checked on CPU.

The lead runs the script in a short GPU window: a configuration compared with the wrong
reference, a block-size variant that changes the prompts or the cache's token budget, or an fp8
run whose reference is bf16 would waste it. Nothing here starts an engine or writes a model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tokenvm_vllm.bench.prefix_reuse import EngineSettings, Workload

SCRIPT = Path(__file__).parents[2] / "ci" / "gpu" / "token_exact.py"
DEFAULTS = ["reference", "none", "tokenvm", "tokenvm_uva", "tokenvm_wt", "tokenvm_layerwise",
            "native", "tokenvm_corrupt", "reference_graphs", "tokenvm_layerwise_graphs"]
"""What runs without --configs (unchanged by issue #14's additions)."""


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("token_exact", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["token_exact"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def build(script: ModuleType, mla_calls: list[int]) -> tuple[dict, list[str], EngineSettings,
                                                             Workload]:
    base = EngineSettings(model="/llama", block_size=16, num_gpu_blocks=160, max_num_seqs=1,
                          dtype="bfloat16")
    workload = Workload(documents=16, questions=4, prefix_blocks=16, suffix_tokens=40,
                        max_tokens=16, batch_size=1)

    def mla_model() -> str:
        mla_calls.append(1)
        return "/deepseek"

    configs, defaults = script.build_configs(base, workload, mla_model)
    return configs, defaults, base, workload


def test_defaults_unchanged_and_every_reference_exists(script: ModuleType) -> None:
    configs, defaults, _, _ = build(script, [])
    assert defaults == DEFAULTS
    for name in ("tokenvm_fp8", "tokenvm_fp8_e5m2", "tokenvm_fp8_pth", "tokenvm_mla",
                 "tokenvm_mla_corrupt", "tokenvm_bs32", "tokenvm_bs64", "tokenvm_bs128"):
        assert configs[name].reference in configs, name
    for name, config in configs.items():
        assert (config.reference is None) == name.startswith("reference"), name
        if config.reference is not None:
            assert configs[config.reference].reference is None, name


def test_each_comparison_shares_everything_but_the_cache_size(script: ModuleType) -> None:
    configs, _, base, workload = build(script, [])
    for name, config in configs.items():
        if config.reference is None:
            continue
        ref = configs[config.reference]
        settings, ref_settings = config.make_settings(), ref.make_settings()
        for field in ("model", "kv_cache_dtype", "block_size", "dtype", "tensor_parallel_size",
                      "max_num_seqs", "attention_backend"):
            assert getattr(settings, field) == getattr(ref_settings, field), (name, field)
        assert config.workload == ref.workload, name
        # the reference keeps every prefix; the compared run's cache is the small one
        tokens = settings.num_gpu_blocks * settings.block_size
        assert tokens == base.num_gpu_blocks * base.block_size, name
        assert ref_settings.num_gpu_blocks * ref_settings.block_size == 2048 * 16, name
        # the same prompts at every block size
        assert config.workload.prefix_blocks * settings.block_size == \
            workload.prefix_blocks * base.block_size, name


def test_new_configurations_say_what_they_test(script: ModuleType) -> None:
    mla_calls: list[int] = []
    configs, _, _, _ = build(script, mla_calls)
    assert mla_calls == []  # the MLA model is made only when an MLA configuration runs
    assert configs["tokenvm_fp8"].make_settings().kv_cache_dtype == "fp8"
    assert configs["tokenvm_fp8_e5m2"].make_settings().kv_cache_dtype == "fp8_e5m2"
    assert configs["tokenvm_fp8_pth"].make_settings().kv_cache_dtype == "fp8_per_token_head"
    for size in (32, 64, 128):
        settings = configs[f"tokenvm_bs{size}"].make_settings()
        assert (settings.block_size, settings.connector) == (size, "tokenvm")
    mla = configs["tokenvm_mla"].make_settings()
    assert (mla.model, mla.connector) == ("/deepseek", "tokenvm") and mla_calls
    assert configs["tokenvm_mla_corrupt"].must_differ
    assert configs["tokenvm_mla_corrupt"].make_settings().extra_config["debug_corrupt_loads"]
    assert not configs["tokenvm_mla"].must_differ


@pytest.mark.parametrize("name, extra", [("sync", {"load_mode": "sync"}),
                                         ("dma", {"copy_path": "dma"})])
def test_issue_10_levers_compare_like_their_default_peers(
        script: ModuleType, name: str, extra: dict[str, str]) -> None:
    """Issue #10's levers (sync loads, DMA-only copies): eager against ``reference``, CUDA
    graphs against ``reference_graphs`` (graphs change bf16 numerics); opt-in, the default set
    unchanged."""
    configs, defaults, _, _ = build(script, [])
    eager, graphs = configs[f"tokenvm_{name}"], configs[f"tokenvm_{name}_graphs"]
    assert (eager.reference, graphs.reference) == ("reference", "reference_graphs")
    for config, eager_engine in ((eager, True), (graphs, False)):
        settings = config.make_settings()
        assert settings.connector == "tokenvm" and not config.must_differ
        assert settings.extra_config == extra
        assert settings.enforce_eager is eager_engine
    assert f"tokenvm_{name}" not in defaults and f"tokenvm_{name}_graphs" not in defaults
