"""Issue #11 item 7 on the real CPU engine: 32 KV blocks of 32 tokens (the block count equals the
block size) used to stop start-up ("cannot find the block dimension"); now TokenVM takes the
block dimension from vLLM, loads blocks, and the outputs equal vLLM's without TokenVM."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tokenvm_vllm.bench.prefix_reuse import EngineSettings, Workload, run_in_subprocess
from tokenvm_vllm.tiny_llama import write_tiny_llama

pytestmark = pytest.mark.e2e

# 12 documents x 2 questions, 4-block prefixes (48 blocks: more than the cache), at most 2
# requests at once (5 blocks each): revisits of evicted prefixes come back from TokenVM.
WORKLOAD = Workload(documents=12, questions=2, prefix_blocks=4, suffix_tokens=24, max_tokens=8,
                    batch_size=2)


def test_32_blocks_of_32_tokens_is_exact(tmp_path):
    model = str(write_tiny_llama(tmp_path / "tiny-llama"))
    base = EngineSettings(model=model, block_size=32, num_gpu_blocks=32, max_num_seqs=2,
                          max_model_len=512, max_num_batched_tokens=512)
    runs = {name: run_in_subprocess(settings, WORKLOAD, tmp_path / f"{name}.json")
            for name, settings in (("baseline", base),
                                   ("tokenvm", replace(base, connector="tokenvm")))}
    baseline, tokenvm = runs["baseline"]["outputs"], runs["tokenvm"]["outputs"]
    assert len(baseline) == 2 * WORKLOAD.documents * WORKLOAD.questions
    assert tokenvm == baseline
    assert runs["tokenvm"]["counters"]["tokenvm:loaded_blocks"] > 0
