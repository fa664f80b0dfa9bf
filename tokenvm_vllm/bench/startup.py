"""A server's start-up, phase by phase, from its log: what ``serve_bench`` reports next to
``/health`` for issue #13's bar (time to ``/health`` with a 20 GiB host tier <= no offload + 5 s).

Why not ``/health`` alone: on one machine the first server started 30-45 s later than the next
ones (a cold page cache for vLLM's files, cold torch.compile and Triton caches; each
configuration compiles once, its settings being part of torch.compile's cache key), so servers
compare only by what their engines did. vLLM logs ``init engine (profile, create kv cache,
warmup model) took X s (compilation: Y s)``; X - Y is the engine's start-up without the part the
caches decide, and TokenVM's host pool logs when it was allocated, fully pinned, and how long
the first step waited for it (``pin_mode: overlap``). Since the pool registers from the
model load on (``connector/early_pool.py``), beside compilation, the table also gives the
whole of it, model load plus engine start-up (``+none all``): that is what a slower load or
compilation would show in.

vLLM's kernel warm-up after the CUDA graph capture (V2's ``warmup_kernels`` and inductor's lazy
initialisation; from "Graph capturing finished" to "Kernel JIT monitor activated") took 0-17 s
on the H200 whatever the configuration (V2, 2026-12-01: no offload 17, 17, 14, 0, 12 and 0
s in six servers, TokenVM 15, 1, 13, 14, 14 and 16 s), when the host pool is long registered.
``+none -wu`` is ``+none all`` without it on both sides: TokenVM's own cost, without a swing
larger than the bar.

``parse`` reads those lines (with several workers, the slowest of each); ``table`` prints one
row per server, each configuration's engine start-up minus compilation next to that of the
``none`` servers (no offload) of the same runs.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable
from datetime import datetime
from typing import Any

_PATTERNS = {
    "load_s": re.compile(r"Model loading took .* and ([\d.]+) seconds"),
    "engine_init_s": re.compile(
        r"init engine \(.*\) took ([\d.]+) s(?: \(compilation: ([\d.]+) s\))?"),
    "pool_alloc_s": re.compile(r"TokenVM host pool: .* allocated in ([\d.]+) s"),
    "pool_pinned_s": re.compile(
        r"TokenVM host pool fully pinned: .* in ([\d.]+) s after start-up"),
    "first_step_wait_s": re.compile(r"the first step waited ([\d.]+) s"),
}
_CAPTURED = re.compile(r" (\d\d-\d\d \d\d:\d\d:\d\d) .*Graph capturing finished")
_WARMED = re.compile(r" (\d\d-\d\d \d\d:\d\d:\d\d) .*Kernel JIT monitor activated")


def _seconds_between(first: str, last: str) -> float:
    """Seconds from log time stamp ``first`` to ``last`` (vLLM's ``MM-DD HH:MM:SS``, which has
    no year: a ``last`` that sorts before ``first`` is in the next year)."""
    year = 2001 if last < first else 2000
    return (datetime.strptime(f"{year}-{last}", "%Y-%m-%d %H:%M:%S")
            - datetime.strptime(f"2000-{first}", "%Y-%m-%d %H:%M:%S")).total_seconds()


def parse(lines: Iterable[str]) -> dict[str, float]:
    """The start-up phases a server log shows (keys of ``_PATTERNS`` plus ``compile_s``,
    ``init_minus_compile_s``, ``load_and_init_s`` and ``kernel_warmup_s``, whole seconds from
    the time stamps; absent when the log has no such line). With several workers, the largest
    value of each (the engine waits for the slowest)."""
    found: dict[str, float] = {}
    captured: str | None = None
    for line in lines:
        if (match := _CAPTURED.search(line)) is not None:
            captured = match.group(1)
        elif (match := _WARMED.search(line)) is not None and captured is not None:
            found["kernel_warmup_s"] = max(found.get("kernel_warmup_s", 0.0),
                                           _seconds_between(captured, match.group(1)))
        for key, pattern in _PATTERNS.items():
            match = pattern.search(line)
            if match is None:
                continue
            found[key] = max(found.get(key, 0.0), float(match.group(1)))
            if key == "engine_init_s" and match.group(2) is not None:
                found["compile_s"] = max(found.get("compile_s", 0.0), float(match.group(2)))
    if "engine_init_s" in found:
        found["init_minus_compile_s"] = found["engine_init_s"] - found.get("compile_s", 0.0)
        if "load_s" in found:
            found["load_and_init_s"] = found["load_s"] + found["engine_init_s"]
            if "kernel_warmup_s" in found:
                found["without_warmup_s"] = found["load_and_init_s"] - found["kernel_warmup_s"]
    return found


def table(entries: list[dict[str, Any]]) -> str:
    """One line per server (``entries``: ``{"config", "round", "up_s", **parse(...)}``), with
    ``+none``: its engine start-up minus compilation over that of the ``none`` server of its
    round (or, without one, the median of all ``none`` servers'),
    ``+none all``: its model load plus engine start-up over theirs, ``warm-up``: vLLM's kernel
    warm-up, and ``+none -wu``: ``+none all`` without the warm-up on both sides."""
    nones = [e for e in entries if e["config"].partition(":")[0].partition("@")[0]
             .removesuffix("_v1").removesuffix("_v2") == "none"]  # (none_v1: the V1 runner)

    def over_none(entry: dict[str, Any], key: str) -> str:
        # the no-offload server of the same round where there is one: the first round's
        # compiles are cold, the later ones' cached (W9, 2026-12-01: 17.8 against 4.3 s), and a
        # median over both compares a cold start with a warm one
        same = [e[key] for e in nones if key in e and e["round"] == entry["round"]]
        base = same or [e[key] for e in nones if key in e]
        return f"{entry[key] - statistics.median(base):+.1f}" if base and key in entry else "-"

    def cell(entry: dict[str, Any], key: str) -> str:
        return f"{entry[key]:.1f}" if key in entry and entry[key] is not None else "-"

    lines = [f"{'start-up':44} {'round':>5} {'/health s':>9} {'load':>5} {'engine s':>8} "
             f"{'compile':>7} {'engine-compile':>14} {'+none':>6} {'+none all':>9} "
             f"{'warm-up':>7} {'+none -wu':>9} "
             f"{'pool alloc':>10} {'pinned at':>9} {'1st step wait':>13}"]
    for e in entries:
        lines.append(f"{e['config'][:44]:44} {e['round']:5d} {cell(e, 'up_s'):>9} "
                     f"{cell(e, 'load_s'):>5} {cell(e, 'engine_init_s'):>8} "
                     f"{cell(e, 'compile_s'):>7} {cell(e, 'init_minus_compile_s'):>14} "
                     f"{over_none(e, 'init_minus_compile_s'):>6} "
                     f"{over_none(e, 'load_and_init_s'):>9} "
                     f"{cell(e, 'kernel_warmup_s'):>7} {over_none(e, 'without_warmup_s'):>9} "
                     f"{cell(e, 'pool_alloc_s'):>10} {cell(e, 'pool_pinned_s'):>9} "
                     f"{cell(e, 'first_step_wait_s'):>13}")
    return "\n".join(lines)
