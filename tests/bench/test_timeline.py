"""bench/timeline.py: joining trace events into per-load gaps (the parser alone; the events of
a real engine are checked in tests/e2e/test_llm_exact.py)."""

from __future__ import annotations

import pytest

from tokenvm_vllm.bench.timeline import parse, print_summary, summarize


def trace(t: float, event: str, **fields: object) -> str:
    rest = "".join(f" {k}={v}" for k, v in fields.items())
    return f"(EngineCore pid=1) INFO 11-30 02:00:00 [x.py:1] TokenVM trace {t:.6f} {event}{rest}"


def test_gaps_per_load_with_two_ranks_and_a_late_lookup() -> None:
    lines = [
        trace(10.000, "lookup", req="a", hit_blocks=4),
        trace(10.001, "step-scheduled", tokens=100),
        trace(10.002, "lookup", req="a", hit_blocks=4),  # asked again: the latest counts
        trace(10.005, "load-submitted", job=7, blocks=4, layerwise=False),  # rank 0
        trace(10.006, "load-submitted", job=7, blocks=4, layerwise=False),  # rank 1
        "unrelated line",
        trace(10.020, "step-scheduled", tokens=50),
        trace(10.025, "load-polled", job=7, device_ms=3.5),
        trace(10.030, "load-polled", job=7, device_ms=4.0),  # the last rank's report
        trace(10.031, "load-finished", job=7, req="a", blocks=4),
        trace(10.040, "step-scheduled", tokens=80),
        trace(10.040, "scheduled-new", req="a"),
        trace(10.050, "load-submitted", job=9, blocks=2, layerwise=False),  # never finished
    ]
    timeline = parse(lines)
    assert timeline.incomplete == 1
    (load,) = timeline.loads
    assert (load.job, load.req, load.blocks, load.device_ms) == (7, "a", 4, 4.0)
    gaps = load.gaps_ms()
    assert gaps is not None
    assert gaps["lookup->submitted"] == pytest.approx(4.0)
    assert gaps["submitted->polled"] == pytest.approx(24.0)
    assert gaps["polled->finished"] == pytest.approx(1.0)
    assert gaps["finished->scheduled"] == pytest.approx(9.0)
    assert timeline.step_intervals_ms == pytest.approx([19.0, 20.0])
    summary = summarize(timeline)
    assert summary["lookup->scheduled"]["p50"] == pytest.approx(38.0)
    assert summary["incomplete_loads"] == 1


def test_an_early_finish_counts_and_the_later_report_of_the_job_does_not() -> None:
    """``load_early_finish``: the scheduler logs load-finished when it hands the request to
    vLLM and again when the worker's report finishes the job; the first is the gap's end."""
    lines = [
        trace(10.000, "lookup", req="a", hit_blocks=4),
        trace(10.005, "load-submitted", job=7, blocks=4, layerwise=False),
        trace(10.016, "load-polled", job=7, device_ms=10.0),
        trace(10.017, "load-finished", job=7, req="a", blocks=4, early=1),
        trace(10.020, "scheduled-new", req="a"),
        trace(10.040, "load-finished", job=7, req="a", blocks=4),
    ]
    (load,) = parse(lines).loads
    gaps = load.gaps_ms()
    assert gaps is not None
    assert gaps["polled->finished"] == pytest.approx(1.0)
    assert gaps["finished->scheduled"] == pytest.approx(3.0)


def test_a_request_scheduled_before_its_load_finished_is_not_matched() -> None:
    lines = [
        trace(1.0, "lookup", req="b", hit_blocks=1),
        trace(1.1, "scheduled-new", req="b"),  # an earlier, unrelated scheduling
        trace(1.2, "load-submitted", job=1, blocks=1, layerwise=False),
        trace(1.3, "load-polled", job=1, device_ms=1.0),
        trace(1.4, "load-finished", job=1, req="b", blocks=1),
    ]
    timeline = parse(lines)
    assert timeline.loads == [] and timeline.incomplete == 1


def test_serve_bench_splits_a_server_log_by_workload_window(tmp_path, capsys) -> None:
    from tokenvm_vllm.bench.serve_bench import add_load_timelines

    def one_load(t0: float, job: int, req: str) -> list[str]:
        return [trace(t0, "lookup", req=req, hit_blocks=2),
                trace(t0 + 0.005, "step-scheduled", tokens=32),
                trace(t0 + 0.01, "load-submitted", job=job, blocks=2, layerwise=False),
                trace(t0 + 0.02, "load-polled", job=job, device_ms=2.0),
                trace(t0 + 0.03, "load-finished", job=job, req=req, blocks=2),
                trace(t0 + 0.05, "scheduled-new", req=req),
                trace(t0 + 0.051, "step-scheduled", tokens=32)]

    log = tmp_path / "x.server.log"
    log.write_text("\n".join(one_load(100.0, 1, "a") + one_load(200.0, 2, "b")
                             + one_load(201.0, 3, "c")))
    result = {"config": "tokenvm", "workloads": {"p8": {"window": [99.0, 150.0]},
                                                 "p32": {"window": [199.0, 250.0]}}}
    add_load_timelines(result, log)
    assert result["workloads"]["p8"]["load_timeline"]["lookup->scheduled"]["n"] == 1
    p32 = result["workloads"]["p32"]["load_timeline"]
    assert p32["lookup->scheduled"]["n"] == 2
    assert p32["finished->scheduled"]["p50"] == pytest.approx(20.0)
    # one 46 ms decode step with the 2 ms copy in it per load; between the loads 0.954 s idle
    assert p32["step_classes"]["decode+copy"]["n"] == 2
    assert "p32 step interval p50 ms: decode 954.00 (n=1)  decode+copy 46.00 (n=2)" in (
        capsys.readouterr().out)
    untraced = {"config": "none", "workloads": {"p8": {"window": [0.0, 1.0]}}}
    (tmp_path / "none.server.log").write_text("no trace here\n")
    add_load_timelines(untraced, tmp_path / "none.server.log")
    assert "load_timeline" not in untraced["workloads"]["p8"]


def test_in_step_loads_are_measured_from_lookup_to_their_own_step() -> None:
    """load_mode sync (or layerwise): the request is scheduled in its lookup step, before its
    copy is queued; only lookup -> scheduled and the copy's device time apply."""
    lines = [
        trace(2.000, "lookup", req="c", hit_blocks=3),
        trace(2.004, "scheduled-new", req="c"),
        trace(2.006, "load-submitted", job=4, blocks=3, layerwise=False, sync=True),
        trace(2.020, "load-polled", job=4, device_ms=2.5),
        trace(2.030, "load-finished", job=4, req="c", blocks=3),
        trace(2.040, "scheduled-new", req="c"),  # a later step: not its first
    ]
    timeline = parse(lines)
    assert timeline.loads == [] and timeline.incomplete == 0
    (load,) = timeline.in_step
    assert load.scheduled == pytest.approx(2.004)
    summary = summarize(timeline)
    assert summary["in-step lookup->scheduled"]["p50"] == pytest.approx(4.0)
    assert summary["in-step copy_device_ms"]["p50"] == pytest.approx(2.5)
    assert summary["lookup->scheduled"]["n"] == 0


def test_the_longest_steps_come_with_the_elastic_events_around_them(capsys) -> None:
    """A burst's stall: the longest step intervals, longest first, each with the elastic
    events from the step before it to its end (what the step's metadata carried)."""
    lines = [
        trace(20.000, "elastic", maps=0, unmaps=0, target=19, reported=0, usable=32),
        trace(20.010, "step-scheduled", tokens=8192),
        trace(20.020, "elastic", maps=19, unmaps=0, target=19, reported=19, usable=640),
        trace(20.250, "step-scheduled", tokens=4096),
        trace(20.260, "step-scheduled", tokens=32),
        trace(20.270, "elastic", maps=12, unmaps=0, target=19, reported=19, usable=1024),
        trace(20.870, "step-scheduled", tokens=32),  # after the 610 ms stall
        trace(20.900, "step-scheduled", tokens=32),
    ]
    timeline = parse(lines, since=19.5)
    assert [e["maps"] for _, e in timeline.elastic] == ["0", "19", "12"]
    summary = summarize(timeline)
    longest = summary["longest_steps"]
    assert [row["ms"] for row in longest] == [610.0, 240.0, 30.0, 10.0]
    assert longest[0]["at_s"] == pytest.approx(0.76) and longest[0]["tokens"] == 32
    assert [e["maps"] for e in longest[0]["elastic"]] == ["12"]  # 20.250 .. 20.870
    assert longest[0]["maps"] == 12 and longest[2]["maps"] == 12
    assert [e["maps"] for e in longest[1]["elastic"]] == ["19"]  # the first step: 20.010 on
    assert [e["maps"] for e in longest[3]["elastic"]] == ["19"]  # 20.010 .. 20.260
    print_summary(summary)
    assert "long step at 0.760 s: 610.0 ms, 32 tokens, elastic maps 12 in 1 steps" in (
        capsys.readouterr().out)


def test_steps_are_classed_by_prefill_and_by_a_copy_beside_them(capsys) -> None:
    """Whether copies slow decode steps: each step interval goes to decode or prefill, with or
    without a copy on the GPU during it; a copy queued behind one of its kind starts after it,
    and one of the other direction does not wait."""
    lines = [
        trace(10.000, "step-scheduled", tokens=32),  # 10.000-10.010: decode, no copy
        trace(10.010, "step-scheduled", tokens=32),  # 10.010-10.030: decode + the store
        trace(10.012, "store-submitted", job=1, blocks=4),  # GPU 10.012-10.022
        trace(10.013, "store-submitted", job=2, blocks=4),  # queued: GPU 10.022-10.042
        trace(10.030, "step-scheduled", tokens=160),  # 10.030-10.060: prefill + store 2
        trace(10.031, "store-polled", job=1, device_ms=10.0),
        trace(10.050, "store-polled", job=2, device_ms=20.0),
        trace(10.060, "step-scheduled", tokens=4096),  # 10.060-10.100: prefill, no copy
        trace(10.100, "step-scheduled", tokens=32),  # 10.100-10.108: decode + the load
        trace(10.101, "load-submitted", job=3, blocks=8, layerwise=False, sync=False),
        trace(10.108, "step-scheduled", tokens=32),  # 10.108-10.115: decode, load done
        trace(10.110, "load-polled", job=3, device_ms=5.0),  # GPU 10.101-10.106: not queued
        trace(10.115, "step-scheduled", tokens=32),
    ]
    summary = summarize(parse(lines))
    classes = summary["step_classes"]
    assert {name: classes[name]["n"] for name in classes} == {
        "decode": 2, "decode+copy": 2, "prefill": 1, "prefill+copy": 1}
    assert classes["decode"]["max"] == pytest.approx(10.0)
    assert classes["decode+copy"]["max"] == pytest.approx(20.0)
    assert classes["prefill"]["p50"] == pytest.approx(40.0)
    assert classes["prefill+copy"]["p50"] == pytest.approx(30.0)
    print_summary(summary)
    assert "steps: decode+copy" in capsys.readouterr().out


def test_request_phases_split_each_ttft_at_the_engine_arrival_and_first_schedule(tmp_path):
    """Three requests sent at 10.000/10.100/10.200 s; the engine sees them 2/3/4 ms later (out
    of id order, so matching must go by time), schedules them 20/30/40 ms after that, and the
    client gets each first token 15 ms after its schedule. A fourth request is in the log
    without a schedule (the log ended): matching stops there."""
    from tokenvm_vllm.bench.serve_bench import add_load_timelines
    from tokenvm_vllm.bench.timeline import request_phases

    lines = [trace(10.002, "arrived", req="z"), trace(10.103, "arrived", req="a"),
             trace(10.204, "arrived", req="m"), trace(10.110, "lookup", req="a", hit_blocks=3),
             trace(10.022, "scheduled-new", req="z"), trace(10.133, "scheduled-new", req="a"),
             trace(10.244, "scheduled-new", req="m"), trace(10.300, "arrived", req="late")]
    start = [10.2, 10.0, 10.1]  # the client's own order need not be the arrival order
    first_token = [10.259, 10.037, 10.148]
    phases = request_phases(parse(lines), start, first_token)
    assert phases["matched"] == 3 and phases["engine_requests"] == 4
    assert phases["client->engine"]["p50"] == pytest.approx(3.0)
    assert phases["engine->scheduled"]["p50"] == pytest.approx(30.0)
    assert phases["engine->scheduled"]["max"] == pytest.approx(40.0)
    assert phases["scheduled->first token"]["max"] == pytest.approx(15.0)
    # A log written before the ``arrived`` event: the first event stands in, and there is no
    # client->engine phase.
    old = request_phases(parse([ln for ln in lines if " arrived " not in ln]), start,
                         first_token)
    assert old["client->engine"]["n"] == 0 and old["matched"] == 3
    assert old["engine->scheduled"]["max"] == pytest.approx(23.0)  # a: lookup -> scheduled
    # serve_bench keeps each workload's send and first-token times and reads them this way
    log = tmp_path / "x.server.log"
    log.write_text("\n".join(lines))
    result = {"config": "tokenvm", "workloads": {"p8": {
        "window": [9.0, 11.0], "requests": {"start_s": start, "first_token_s": first_token}}}}
    add_load_timelines(result, log)
    assert result["workloads"]["p8"]["request_phases"]["matched"] == 3


def test_the_slowest_requests_come_with_their_ask_again_reasons_and_load(tmp_path) -> None:
    """Three requests: ``b`` (sent second) is put off twice and waits for another's load once,
    then loads 4 blocks; it is the slowest. ``a`` computes; ``c`` waits for nothing."""
    from tokenvm_vllm.bench.serve_bench import add_load_timelines
    from tokenvm_vllm.bench.timeline import describe_request, slowest_requests

    lines = [trace(10.001, "arrived", req="a"), trace(10.011, "scheduled-new", req="a"),
             trace(10.102, "arrived", req="b"),
             trace(10.110, "asked-again", req="b", why="defer"),
             trace(10.120, "asked-again", req="b", why="defer"),
             trace(10.130, "asked-again", req="b", why="loading"),
             trace(10.140, "lookup", req="b", hit_blocks=4),
             trace(10.150, "load-submitted", job=1, blocks=4),
             trace(10.170, "load-polled", job=1, device_ms=3.0),
             trace(10.180, "load-finished", job=1, req="b", blocks=4),
             trace(10.190, "scheduled-new", req="b"),
             trace(10.203, "arrived", req="c"), trace(10.213, "scheduled-new", req="c")]
    start, first_token = [10.0, 10.1, 10.2], [10.02, 10.2, 10.225]
    rows = slowest_requests(parse(lines), start, first_token, count=2)
    assert [row["index"] for row in rows] == [1, 2]
    slowest = rows[0]
    assert slowest["ttft_ms"] == pytest.approx(100.0)
    assert slowest["engine->scheduled"] == pytest.approx(88.0)
    assert slowest["asked_again"] == {"defer": 2, "loading": 1}
    assert slowest["load_ms"] == pytest.approx(50.0) and slowest["load_blocks"] == 4
    assert rows[1]["asked_again"] == {} and rows[1]["load_ms"] is None
    # reached by the scheduler 8 ms after it arrived, then held by "ask again" for 20 ms
    assert slowest["first_reached_ms"] == pytest.approx(8.0)
    assert slowest["asked_over_ms"] == pytest.approx(20.0)
    assert rows[1]["asked_over_ms"] is None
    assert rows[1]["first_reached_ms"] == pytest.approx(10.0)
    assert describe_request(slowest) == (
        "#1 100 ms (engine->scheduled 88: first reached after 8, asked again over 20 ms: "
        "defer 2, loading 1, load 50 ms)")
    assert describe_request(rows[1]) == "#2 25 ms (engine->scheduled 10)"
    log = tmp_path / "x.server.log"
    log.write_text("\n".join(lines))
    result = {"config": "tokenvm", "workloads": {"poisson": {
        "window": [9.0, 11.0], "requests": {"start_s": start, "first_token_s": first_token}}}}
    add_load_timelines(result, log)
    assert result["workloads"]["poisson"]["slowest_requests"][0]["index"] == 1


def test_the_first_loads_of_a_window_are_summarised_apart(tmp_path, capsys) -> None:
    """``first_loads``: the first ``FIRST_LOADS`` loads by lookup time (where a burst's growth
    lands), here slow ones followed by fast ones; ``--result`` summarises each workload's
    window of a serve_bench result JSON."""
    import json
    import sys

    from tokenvm_vllm.bench import timeline as tl

    lines = []
    for i in range(tl.FIRST_LOADS + 8):  # 40 ms each for the first 16, then 10 ms
        t, cost = 100.0 + i, (0.040 if i < tl.FIRST_LOADS else 0.010)
        lines += [trace(t, "lookup", req=f"r{i}", hit_blocks=2),
                  trace(t + cost / 4, "load-submitted", job=i, blocks=2, layerwise=False),
                  trace(t + cost / 2, "load-polled", job=i, device_ms=1.0),
                  trace(t + cost * 3 / 4, "load-finished", job=i, req=f"r{i}", blocks=2),
                  trace(t + cost, "scheduled-new", req=f"r{i}")]
    summary = summarize(parse(lines))
    first = summary["first_loads"]
    assert first["lookup->scheduled"]["n"] == tl.FIRST_LOADS
    assert first["lookup->scheduled"]["p50"] == pytest.approx(40.0)
    assert summary["lookup->scheduled"]["p50"] == pytest.approx(40.0)  # 16 of 24 are slow
    assert first["lookup->submitted"]["p50"] == pytest.approx(10.0)
    later = summarize(parse(lines, since=100.0 + tl.FIRST_LOADS))  # a window of fast ones
    assert later["first_loads"]["lookup->scheduled"]["p50"] == pytest.approx(10.0)
    log = tmp_path / "server.log"
    log.write_text("\n".join(lines))
    result = tmp_path / "config.json"
    result.write_text(json.dumps({"workloads": {
        "burst1": {"window": [99.0, 100.0 + tl.FIRST_LOADS - 0.5]},
        "burst2": {"window": [100.0 + tl.FIRST_LOADS - 0.5, 200.0]}}}))
    old_argv = sys.argv
    sys.argv = ["timeline", str(log), "--result", str(result)]
    try:
        tl.main()
    finally:
        sys.argv = old_argv
    out = capsys.readouterr().out
    assert "== burst1" in out and "== burst2" in out
    assert "first 16 loads, p50 ms:" in out and "first 8 loads, p50 ms:" in out
    assert "lookup->scheduled 40.0" in out and "lookup->scheduled 10.0" in out
