"""End to end in the real vLLM engine on CPU: ``load_mode="sync"`` gives the greedy outputs of
vLLM without TokenVM, token for token, with its loads run in the lookup step (never parked) and
with failed loads recomputed.

Same workload and tiny Llama (std-0.02 random weights) as ``test_llm_exact.py``, whose
``test_corrupted_loads_change_outputs`` shows that this comparison can fail.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from tests.e2e.test_llm_exact import WORKLOAD, differing
from tokenvm_vllm.bench.prefix_reuse import run_in_subprocess

pytestmark = pytest.mark.e2e

TRACE = re.compile(r"TokenVM trace (\d+\.\d+) (lookup|load-finished|scheduled-new) .*req=(\S+)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, engine_settings) -> dict:
    tmp = tmp_path_factory.mktemp("e2e_sync")
    base = engine_settings(num_gpu_blocks=72)
    configs = {
        "baseline": base,
        # trace only logs: the scheduler's events show when each loading request first ran
        "sync": replace(base, connector="tokenvm",
                        extra_config={"load_mode": "sync", "trace": True}),
        "sync_fail": replace(base, connector="tokenvm", extra_config={
            "load_mode": "sync", "debug_fail_load_every": 2, "testing": True}),
    }
    runs = {name: run_in_subprocess(settings, WORKLOAD, Path(tmp / f"{name}.json"))
            for name, settings in configs.items()}
    runs["sync"]["log"] = (tmp / "sync.log").read_text()
    return runs


def test_sync_loads_are_exact(runs):
    counters = runs["sync"]["counters"]
    assert counters["tokenvm:sync_loaded_blocks"] > 100
    assert counters["tokenvm:sync_loaded_blocks"] == counters["tokenvm:loaded_blocks"]
    assert counters["vllm:prompt_tokens_by_source[external_kv_transfer]"] > 0
    assert differing(runs["sync"]["outputs"], runs["baseline"]["outputs"]) == 0


def test_sync_loads_run_their_request_before_the_copy_is_reported(runs):
    """Not parked: each loading request's first tokens are scheduled in its lookup's step, so
    before the scheduler hears that the load finished (an async load comes after it)."""
    lookup: dict[str, float] = {}
    scheduled: dict[str, float] = {}
    loads = 0
    for line in runs["sync"]["log"].splitlines():
        match = TRACE.search(line)
        if match is None:
            continue
        t, event, req = float(match.group(1)), match.group(2), match.group(3)
        if event == "lookup":
            lookup[req] = t
            scheduled.pop(req, None)
        elif event == "scheduled-new":
            scheduled.setdefault(req, t)
        else:  # load-finished
            loads += 1
            assert req in scheduled and lookup[req] <= scheduled[req] <= t, req
    assert loads > 0


def test_failed_sync_loads_are_recomputed_exactly(runs):
    """A failed load is reported after the forward that read its blocks: vLLM must discard
    that step's work on them and recompute."""
    counters = runs["sync_fail"]["counters"]
    assert counters["tokenvm:failed_load_blocks"] > 0
    assert counters["tokenvm:loaded_blocks"] > counters["tokenvm:failed_load_blocks"]
    assert differing(runs["sync_fail"]["outputs"], runs["baseline"]["outputs"]) == 0
