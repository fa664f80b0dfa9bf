"""Where a load's time goes, from a server or engine log written with ``trace: true``.

    python -m tokenvm_vllm.bench.timeline SERVER_LOG [--json OUT]
    python -m tokenvm_vllm.bench.timeline SERVER_LOG --result CONFIG.json   # per workload

Issue #10 asks for a per-step timeline: under load TokenVM and vLLM native both compute the
minimum, so TTFT differences come from how a load reaches the forward pass. With ``trace`` on,
the scheduler and every worker log ``TokenVM trace <time.monotonic()> <event> k=v ...`` (one
clock for all processes of a machine). Each async load goes through five events, and this tool
measures the four gaps between them, per load, then prints their distributions:

- ``lookup`` (scheduler: the hit) -> ``load-submitted`` (worker: the copy is queued; the gap is
  the scheduling step plus the metadata reaching the worker),
- ``load-submitted`` -> ``load-polled`` (worker: ``get_finished`` saw the copy done; includes
  the wait for the step that polls; ``device_ms`` is the copy's own time on the GPU),
- ``load-polled`` -> ``load-finished`` (scheduler: every rank has reported; with
  ``load_early_finish``, the scheduler took the request from the worker in its process),
- ``load-finished`` -> ``scheduled-new`` (scheduler: the request's first tokens are scheduled).

Per request (``request_phases``), where its TTFT went: from the client sending it
(``vllm bench serve``'s ``start_times``: ``time.perf_counter()``, the same clock on Linux) to
the engine's ``arrived`` event (the API server and the engine's input queue), from there to
``scheduled-new`` (scheduling, a lookup and a load if it had one), and from there to its first
token at the client (the step's forward, sampling, detokenizing, the response). The client's
requests and the engine's are matched in arrival order (the API server forwards them in the
order they came; two sent within a millisecond may swap, which moves no percentile much).

The slowest requests (``slowest_requests``), each with its arrival index, its phases, how often
vLLM's lookup of it was answered "ask again" and why (``asked-again`` events: ``defer`` is
``load_defer_steps``, ``loading`` another request loading its blocks, ``disk`` a promotion or
remote read in flight), and its load's own time: whether a TTFT tail is one run of arrivals
and what held it.

The first ``FIRST_LOADS`` loads of the window (in lookup order) are also summarised apart
(``first_loads``): at the start of a burst after an idle period an elastic pool grows at each
arrival, and whatever that growth costs lands on exactly these loads.

Steps by what they carried (``step_classes``): the interval from each ``step-scheduled`` to the
next, split into decode-only steps (at most ``DECODE_TOKENS`` tokens) and steps with a prefill,
each with and without a copy on the GPU during it. A copy's GPU time is taken as its
``device_ms`` from its ``load-submitted`` / ``store-submitted``, after the copy of its kind
before it (one stream per direction). Whether copies slow the decode steps beside them (issue
#10's third defect) is then the ``decode+copy`` row against ``decode``, in one server's run.

Also the engine step interval (``step-scheduled`` to the next), and the longest intervals
(``longest_steps``: when, how long, the tokens the step scheduled, and the elastic pool's events
in it: ``elastic`` lines, one per step that maps, unmaps or changes the reserve, with
``elastic: true``), for a burst whose TTFT one stall decides. A load is listed only when every
event was found; the count of incomplete ones is printed (a log that ends mid-run).

In-step loads (``load_mode`` ``sync`` or ``layerwise``) schedule the request in its lookup step,
before the copy is even queued: for them only ``lookup -> scheduled`` and the copy's device time
mean something, and they are listed apart (``in-step``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from tokenvm_vllm.bench.stats import percentile

TRACE = re.compile(r"TokenVM trace (\d+\.\d+) (\S+)((?: \S+=\S+)*)")
PHASES = ("lookup->submitted", "submitted->polled", "polled->finished", "finished->scheduled")
FIRST_LOADS = 16
"""Loads at the start of a window summarised apart (``summarize``'s ``first_loads``)."""
DECODE_TOKENS = 64
"""A step scheduling at most this many tokens is counted a decode-only step (``step_classes``):
it carries no prompt chunk of the sizes the serving benchmark sends (128-token suffixes and
more)."""
STEP_CLASSES = ("decode", "decode+copy", "prefill", "prefill+copy")


@dataclass
class Load:
    """The events of one async load (times in seconds of ``time.monotonic()``)."""

    job: int
    req: str | None = None
    lookup: float | None = None
    submitted: float | None = None
    polled: float | None = None
    device_ms: float | None = None
    finished: float | None = None
    scheduled: float | None = None
    blocks: int = 0
    in_step: bool = False
    """Sync or layer-wise: the request was scheduled in its lookup step, before the copy."""

    def gaps_ms(self) -> dict[str, float] | None:
        """The four gaps in ms, or None while an event is missing."""
        times = (self.lookup, self.submitted, self.polled, self.finished, self.scheduled)
        if any(t is None for t in times):
            return None
        points = [t for t in times if t is not None]
        return {name: (b - a) * 1000
                for name, (a, b) in zip(PHASES, pairwise(points), strict=True)}


@dataclass
class Timeline:
    loads: list[Load] = field(default_factory=list)
    step_intervals_ms: list[float] = field(default_factory=list)
    incomplete: int = 0
    in_step: list[Load] = field(default_factory=list)
    """Loads whose request was scheduled before the load finished (sync, layer-wise)."""
    steps: list[tuple[float, int]] = field(default_factory=list)
    """``(time, tokens scheduled)`` of every step that scheduled tokens."""
    elastic: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    """The elastic pool's per-step events (``scheduler_side.take_commands``)."""
    requests: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per request id, the first time of each of its events (``arrived``, ``lookup``,
    ``scheduled-new``, ``asked-again``) and the last time it was asked again
    (``last-asked``)."""
    asked_again: dict[str, Counter[str]] = field(default_factory=dict)
    """Per request id, how often its lookup was answered "ask again", by reason (``defer``:
    ``load_defer_steps``; ``loading``: another request was loading its blocks; ``disk``: a
    promotion or remote read in flight)."""
    copies: list[tuple[float, float]] = field(default_factory=list)
    """``(start, end)`` of every copy's estimated time on the GPU, loads and stores."""
    since: float = 0.0


def parse(lines: Iterable[str], since: float = 0.0, until: float = float("inf")) -> Timeline:
    """Join the trace events of ``lines`` stamped in ``[since, until]`` (``time.monotonic()``:
    e.g. one workload of a serving run) into loads. With several ranks, a job's
    ``load-polled`` is the last rank's (the job finishes only when every rank has reported)."""
    events: list[tuple[float, str, dict[str, str]]] = []
    for line in lines:
        match = TRACE.search(line)
        if match and since <= float(match.group(1)) <= until:
            fields = dict(kv.split("=", 1) for kv in match.group(3).split())
            events.append((float(match.group(1)), match.group(2), fields))
    events.sort(key=lambda e: e[0])
    loads: dict[int, Load] = {}
    lookups: dict[str, float] = {}  # req -> time of its latest hit
    waiting: dict[str, Load] = {}  # req -> its finished load, until the request is scheduled
    scheduled: dict[str, float] = {}  # req -> when it was first scheduled after its lookup
    steps: list[tuple[float, int]] = []
    elastic: list[tuple[float, dict[str, str]]] = []
    requests: dict[str, dict[str, float]] = {}
    asked_again: dict[str, Counter[str]] = {}
    submitted: dict[int, tuple[str, float]] = {}  # job -> (kind, submitted at)
    copies: dict[int, tuple[str, float, float]] = {}  # job -> (kind, submitted, device ms)
    for t, name, f in events:
        if name in ("load-submitted", "store-submitted"):
            submitted[int(f["job"])] = (name.partition("-")[0], t)
        elif name in ("load-polled", "store-polled") and int(f["job"]) in submitted:
            kind, at = submitted[int(f["job"])]
            copies[int(f["job"])] = (kind, at, float(f["device_ms"]))
        if name in ("arrived", "lookup", "scheduled-new", "asked-again") and "req" in f:
            requests.setdefault(f["req"], {}).setdefault(name, t)
        if name == "asked-again":
            asked_again.setdefault(f["req"], Counter())[f["why"]] += 1
            requests[f["req"]]["last-asked"] = t
        if name == "lookup":
            lookups[f["req"]] = t
            scheduled.pop(f["req"], None)
        elif name == "load-submitted":
            loads[int(f["job"])] = Load(
                job=int(f["job"]), submitted=t, blocks=int(f["blocks"]),
                in_step="True" in (f.get("sync"), f.get("layerwise")))
        elif name == "load-polled" and int(f["job"]) in loads:
            load = loads[int(f["job"])]
            load.polled, load.device_ms = t, float(f["device_ms"])
        elif (name == "load-finished" and int(f["job"]) in loads
              and loads[int(f["job"])].finished is None):
            # (the first: with load_early_finish the scheduler logs one when it hands the
            # request to vLLM and another when the worker's report finishes the job)
            load = loads[int(f["job"])]
            load.finished, load.req = t, f["req"]
            load.lookup = lookups.get(f["req"])
            if load.in_step:  # its request runs since its lookup step
                load.scheduled = scheduled.get(f["req"])
            else:
                waiting[f["req"]] = load
        elif name == "scheduled-new" and f["req"] in waiting:
            waiting.pop(f["req"]).scheduled = t
        elif name == "scheduled-new" and f["req"] in lookups:
            scheduled.setdefault(f["req"], t)
        elif name == "step-scheduled":
            steps.append((t, int(f.get("tokens", 0))))
        elif name == "elastic":
            elastic.append((t, f))
    timeline = Timeline(step_intervals_ms=[(b - a) * 1000 for (a, _), (b, _) in pairwise(steps)],
                        steps=steps, elastic=elastic, requests=requests,
                        asked_again=asked_again,
                        copies=_copy_windows(list(copies.values())),
                        since=since if since > 0 else (events[0][0] if events else 0.0))
    for load in loads.values():
        if load.in_step:
            if load.lookup is None or load.scheduled is None or load.polled is None:
                timeline.incomplete += 1
            else:
                timeline.in_step.append(load)
        elif load.gaps_ms() is None:
            timeline.incomplete += 1
        else:
            timeline.loads.append(load)
    return timeline


def _copy_windows(copies: list[tuple[str, float, float]]) -> list[tuple[float, float]]:
    """Each copy's estimated span on the GPU: ``device_ms`` from its submission, or from the
    end of the copy of its kind before it (a direction's copies run one after another)."""
    windows: list[tuple[float, float]] = []
    ends: dict[str, float] = {}
    for kind, at, device_ms in sorted(copies, key=lambda c: c[1]):
        start = max(at, ends.get(kind, 0.0))
        ends[kind] = start + device_ms / 1000
        windows.append((start, ends[kind]))
    return windows


def step_classes(timeline: Timeline) -> dict[str, dict[str, float]]:
    """Step intervals (ms) by ``STEP_CLASSES``: decode-only or with a prefill
    (``DECODE_TOKENS``), and whether a copy's GPU span overlapped the step."""
    busy: list[list[float]] = []  # the copies' spans merged: sorted, disjoint
    for a, b in sorted(timeline.copies):
        if busy and a <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], b)
        else:
            busy.append([a, b])
    intervals: dict[str, list[float]] = {name: [] for name in STEP_CLASSES}
    j = 0  # steps come in time order: one pass over both (a long run has many of each)
    for (start, tokens), (end, _) in pairwise(timeline.steps):
        while j < len(busy) and busy[j][1] <= start:
            j += 1
        copying = j < len(busy) and busy[j][0] < end
        name = ("decode" if tokens <= DECODE_TOKENS else "prefill") + ("+copy" if copying else "")
        intervals[name].append((end - start) * 1000)
    return {name: _stats(values) for name, values in intervals.items()}


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(ordered), "p50": statistics.median(ordered),
            "p90": percentile(ordered, 0.9), "max": ordered[-1],
            "mean": statistics.fmean(ordered)}


def _phase_stats(loads: list[Load]) -> dict[str, dict[str, float]]:
    """Each of ``PHASES`` and their sum, ``lookup->scheduled``, over complete async loads."""
    gaps = [g for g in (load.gaps_ms() for load in loads) if g is not None]
    stats = {name: _stats([g[name] for g in gaps]) for name in PHASES}
    stats["lookup->scheduled"] = _stats([sum(g.values()) for g in gaps])
    return stats


def summarize(timeline: Timeline) -> dict[str, Any]:
    summary: dict[str, Any] = dict(_phase_stats(timeline.loads))
    first = sorted(timeline.loads, key=lambda load: load.lookup or 0.0)[:FIRST_LOADS]
    summary["first_loads"] = _phase_stats(first)
    summary["copy_device_ms"] = _stats([load.device_ms or 0.0 for load in timeline.loads])
    summary["in-step lookup->scheduled"] = _stats(
        [(load.scheduled - load.lookup) * 1000 for load in timeline.in_step
         if load.scheduled is not None and load.lookup is not None])
    summary["in-step copy_device_ms"] = _stats(
        [load.device_ms or 0.0 for load in timeline.in_step])
    summary["step_interval_ms"] = _stats(timeline.step_intervals_ms)
    summary["step_classes"] = step_classes(timeline)
    summary["longest_steps"] = longest_steps(timeline)
    summary["incomplete_loads"] = timeline.incomplete
    return summary


REQUEST_PHASES = ("client->engine", "engine->scheduled", "scheduled->first token")


def _matched(timeline: Timeline, start_s: list[float], first_token_s: list[float]
             ) -> list[tuple[int, float, float, float, str, dict[str, float]]]:
    """The client's requests matched to the engine's in arrival order (``request_phases``):
    ``(arrival index, sent, first token, arrived, request id, its events)``, up to the first
    engine request with no ``scheduled-new`` (a log that ends mid-run)."""
    client = sorted(zip(start_s, first_token_s, strict=True))
    engine = sorted((ev.get("arrived", min(ev.values())), req, ev)
                    for req, ev in timeline.requests.items())
    matched = []
    for index, ((sent, first_token), (arrived, req, ev)) in enumerate(
            zip(client, engine, strict=False)):
        if ev.get("scheduled-new") is None:
            break
        matched.append((index, sent, first_token, arrived, req, ev))
    return matched


def request_phases(timeline: Timeline, start_s: list[float],
                   first_token_s: list[float]) -> dict[str, Any]:
    """Where the requests' TTFT went (module docstring): ``start_s`` and ``first_token_s`` are
    each request's send and first-token times at the client, in one order. Requests are
    matched in arrival order: the engine's by their ``arrived`` event (or, in a log written
    before that event existed, their first ``lookup`` or ``scheduled-new``); an engine request
    with no ``scheduled-new`` ends the matching (a log that ends mid-run). Returns each phase's
    distribution in ms (``client->engine`` only with ``arrived`` events) and ``matched``."""
    phases: dict[str, list[float]] = {name: [] for name in REQUEST_PHASES}
    matched = _matched(timeline, start_s, first_token_s)
    for _, sent, first_token, arrived, _, ev in matched:
        if "arrived" in ev:
            phases["client->engine"].append((arrived - sent) * 1000)
        phases["engine->scheduled"].append((ev["scheduled-new"] - arrived) * 1000)
        phases["scheduled->first token"].append((first_token - ev["scheduled-new"]) * 1000)
    return {**{name: _stats(values) for name, values in phases.items()},
            "matched": len(matched), "client_requests": len(start_s),
            "engine_requests": len(timeline.requests)}


def slowest_requests(timeline: Timeline, start_s: list[float], first_token_s: list[float],
                     count: int = 8) -> list[dict[str, Any]]:
    """The ``count`` matched requests with the longest TTFT, slowest first: their arrival
    index, TTFT, ``request_phases``' phases, how often their lookup was answered "ask again"
    and why, and their load's ``lookup->scheduled`` if they had one: whether a TTFT tail is
    one run of arrivals, and what held it (issue #10's Poisson p99)."""
    loads = {load.req: load for load in timeline.loads if load.req is not None}
    rows: list[dict[str, Any]] = []
    for index, sent, first_token, arrived, req, ev in _matched(timeline, start_s, first_token_s):
        load = loads.get(req)
        gaps = load.gaps_ms() if load is not None else None
        # vLLM's scheduler first reached it at its first lookup answer (a hit, or "ask again")
        reached = min(ev.get(name, ev["scheduled-new"])
                      for name in ("lookup", "asked-again", "scheduled-new"))
        asked = "asked-again" in ev
        rows.append({
            "index": index, "ttft_ms": round((first_token - sent) * 1000, 1),
            "client->engine": round((arrived - sent) * 1000, 1) if "arrived" in ev else None,
            "engine->scheduled": round((ev["scheduled-new"] - arrived) * 1000, 1),
            "first_reached_ms": round((reached - arrived) * 1000, 1),
            "asked_over_ms": (round((ev["last-asked"] - ev["asked-again"]) * 1000, 1)
                              if asked else None),
            "asked_again": dict(timeline.asked_again.get(req, {})),
            "load_ms": round(sum(gaps.values()), 1) if gaps else None,
            "load_blocks": load.blocks if load is not None else 0})
    return sorted(rows, key=lambda row: -row["ttft_ms"])[:count]


def describe_request(row: dict[str, Any]) -> str:
    """One ``slowest_requests`` row in a line: ``#60 2742 ms (engine->scheduled 2121: first
    reached after 1203, asked again over 633 ms: defer 5, load 59 ms)``: how long it queued
    before vLLM's scheduler reached it, then how long "ask again" answers held it."""
    asked = ", ".join(f"{why} {n}" for why, n in sorted(row["asked_again"].items()))
    held = (f": first reached after {row['first_reached_ms']:.0f}, asked again over "
            f"{row['asked_over_ms']:.0f} ms: {asked}" if asked else "")
    return (f"#{row['index']} {row['ttft_ms']:.0f} ms (engine->scheduled "
            f"{row['engine->scheduled']:.0f}{held}"
            + (f", load {row['load_ms']:.0f} ms" if row["load_ms"] is not None else "") + ")")


def longest_steps(timeline: Timeline, count: int = 5) -> list[dict[str, Any]]:
    """The ``count`` longest step intervals, longest first: when the step began (seconds from
    the window's start), its length, the tokens it scheduled, and the elastic events stamped
    from the previous step's start to its end (what the step's metadata carried, and what was
    decided while it ran) with their page-group maps summed (``maps``)."""
    spans = list(pairwise(timeline.steps))
    ranked = sorted(range(len(spans)), key=lambda i: spans[i][1][0] - spans[i][0][0],
                    reverse=True)[:count]
    rows: list[dict[str, Any]] = []
    for i in ranked:
        (start, tokens), (end, _) = spans[i]
        before = timeline.steps[i - 1][0] if i else start
        elastic = [f for t, f in timeline.elastic if before <= t <= end]
        rows.append({"at_s": round(start - timeline.since, 3),
                     "ms": round((end - start) * 1000, 1), "tokens": tokens,
                     "elastic": elastic, "maps": sum(int(f.get("maps", 0)) for f in elastic)})
    return rows


def print_summary(summary: dict[str, Any]) -> None:
    print(f"{'gap (ms)':24s} {'n':>6s} {'p50':>9s} {'p90':>9s} {'max':>9s} {'mean':>9s}")
    names = (*PHASES, "lookup->scheduled", "copy_device_ms", "in-step lookup->scheduled",
             "in-step copy_device_ms", "step_interval_ms")
    for name in names:
        s = summary.get(name, {"n": 0})
        if not s["n"]:
            print(f"{name:24s} {0:6d}")
            continue
        print(f"{name:24s} {s['n']:6d} {s['p50']:9.2f} {s['p90']:9.2f} {s['max']:9.2f} "
              f"{s['mean']:9.2f}")
    for name, s in summary.get("step_classes", {}).items():
        if s["n"]:
            print(f"{'steps: ' + name:24s} {s['n']:6d} {s['p50']:9.2f} {s['p90']:9.2f} "
                  f"{s['max']:9.2f} {s['mean']:9.2f}")
    for row in summary.get("longest_steps", []):
        print(f"long step at {row['at_s']:.3f} s: {row['ms']:.1f} ms, {row['tokens']} tokens"
              + (f", elastic maps {row['maps']} in {len(row['elastic'])} steps"
                 if row["elastic"] else ""))
    first = summary.get("first_loads", {})
    if first.get("lookup->scheduled", {}).get("n"):
        print(f"first {first['lookup->scheduled']['n']} loads, p50 ms: " + "  ".join(
            f"{name} {first[name]['p50']:.1f}" for name in (*PHASES, "lookup->scheduled")))
    if summary["incomplete_loads"]:
        print(f"({summary['incomplete_loads']} loads without every event: left out)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", help="server or engine logs written with trace: true")
    parser.add_argument("--json", help="write the summary here too")
    parser.add_argument("--result", help="a serve_bench configuration's result JSON: summarise "
                        "each of its workloads over that workload's time window")
    args = parser.parse_args()
    lines: list[str] = []
    for path in args.logs:
        lines.extend(Path(path).read_text(errors="replace").splitlines())
    windows: dict[str, tuple[float, float]] = {"all": (0.0, float("inf"))}
    if args.result:
        workloads = json.loads(Path(args.result).read_text())["workloads"]
        windows = {name: tuple(entry["window"]) for name, entry in workloads.items()}
    summaries = {}
    for name, (since, until) in windows.items():
        if args.result:
            print(f"== {name}")
        summaries[name] = summarize(parse(lines, since, until))
        print_summary(summaries[name])
    if args.json:
        Path(args.json).write_text(json.dumps(
            summaries if args.result else summaries["all"], indent=1))


if __name__ == "__main__":
    main()
