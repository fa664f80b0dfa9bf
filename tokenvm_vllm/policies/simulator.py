"""Trace-driven comparison of the eviction policies against Belady's optimum.

Traces are lists of block keys in access order, modelled on how vLLM reads KV blocks: a request
reads its prefix blocks (hits if the tier still holds them) and then writes new ones (always
misses, then inserted). ``simulate`` drives a policy exactly as ``HostTier`` does, with no
pinning; ``belady`` gives the best hit count any demand-paged policy could reach.

Run ``python -m tokenvm_vllm.policies.simulator --help`` for the CLI, which prints one table per
capacity: a row per trace, a column per policy plus Belady, hit rates in percent.
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from tokenvm_vllm.policies import POLICIES, EvictionPolicy, make_policy

Trace = list[Hashable]


def _key(kind: str, *ids: int) -> bytes:
    # Readable bytes keys (production keys are bytes too); distinct kinds never collide.
    return "/".join((kind, *map(str, ids))).encode()


# -- trace generators ------------------------------------------------------------------------


def multi_turn_chat(
    seed: int = 0,
    num_conversations: int = 200,
    concurrent: int = 12,
    turns: tuple[int, int] = (2, 10),
    first_blocks: tuple[int, int] = (4, 20),
    blocks_per_turn: tuple[int, int] = (1, 6),
) -> Trace:
    """Interleaved chat sessions; each turn re-reads its whole conversation, then appends.

    ``concurrent`` conversations are open at a time; each step picks one at random and runs its
    next turn: read blocks ``0..L-1`` of that conversation, then write ``k`` new blocks (the
    previous answer plus the new user message), ``k`` uniform in ``blocks_per_turn`` (in
    ``first_blocks`` for the first turn). A conversation lasts a uniform number of ``turns``; a
    finished one is replaced by a new one until ``num_conversations`` have started. Reuse
    distance of a block is the blocks the other open conversations touch in between.
    """
    rng = random.Random(seed)
    trace: Trace = []
    started = 0
    # Per open conversation: [id, blocks so far, turns left].
    open_convs: list[list[int]] = []

    def start() -> None:
        nonlocal started
        open_convs.append([started, 0, rng.randint(*turns)])
        started += 1

    while started < min(concurrent, num_conversations):
        start()
    while open_convs:
        i = rng.randrange(len(open_convs))
        conv = open_convs[i]
        cid, length, _ = conv
        trace.extend(_key("chat", cid, b) for b in range(length))
        new = rng.randint(*(first_blocks if length == 0 else blocks_per_turn))
        trace.extend(_key("chat", cid, b) for b in range(length, length + new))
        conv[1] += new
        conv[2] -= 1
        if conv[2] == 0:
            open_convs.pop(i)
            if started < num_conversations:
                start()
    return trace


def shared_system_prompt(
    seed: int = 0,
    num_prompts: int = 10,
    prompt_blocks: tuple[int, int] = (8, 48),
    num_requests: int = 1000,
    suffix_blocks: tuple[int, int] = (2, 16),
    zipf_s: float = 1.0,
) -> Trace:
    """Independent requests, each a shared system prompt followed by a unique suffix.

    ``num_prompts`` system prompts of uniform random length in ``prompt_blocks``; each request
    picks one with Zipf(``zipf_s``) popularity (prompt ``r`` has weight ``1 / (r+1)**zipf_s``),
    reads all its blocks, then writes its own ``suffix_blocks`` blocks, never read again. Popular
    prompts stay hot under any policy; the rare ones are where the policies differ.
    """
    rng = random.Random(seed)
    lengths = [rng.randint(*prompt_blocks) for _ in range(num_prompts)]
    weights = [1.0 / (rank + 1) ** zipf_s for rank in range(num_prompts)]
    trace: Trace = []
    for request in range(num_requests):
        prompt = rng.choices(range(num_prompts), weights)[0]
        trace.extend(_key("sys", prompt, b) for b in range(lengths[prompt]))
        trace.extend(_key("req", request, b) for b in range(rng.randint(*suffix_blocks)))
    return trace


def long_document_qa(
    seed: int = 0,
    num_docs: int = 10,
    doc_blocks: tuple[int, int] = (48, 160),
    num_questions: int = 350,
    concurrent_docs: int = 3,
    questions_per_visit: tuple[int, int] = (5, 30),
    question_blocks: tuple[int, int] = (1, 3),
) -> Trace:
    """A few long documents, each asked many questions, with documents revisited later.

    A library of ``num_docs`` documents (lengths uniform in ``doc_blocks``). ``concurrent_docs``
    documents are "open"; each question picks an open one at random, reads all its blocks, then
    writes a unique question of ``question_blocks`` blocks. After a uniform number of
    ``questions_per_visit`` a document is closed and a random library document (possibly the same,
    often one seen before) opens. Several long documents read cyclically are LRU's weak spot
    once they do not fit together.
    """
    rng = random.Random(seed)
    lengths = [rng.randint(*doc_blocks) for _ in range(num_docs)]
    # Per open document: [doc id, questions left in this visit].
    open_docs = [[rng.randrange(num_docs), rng.randint(*questions_per_visit)]
                 for _ in range(concurrent_docs)]
    trace: Trace = []
    for question in range(num_questions):
        visit = open_docs[rng.randrange(concurrent_docs)]
        doc = visit[0]
        trace.extend(_key("doc", doc, b) for b in range(lengths[doc]))
        trace.extend(_key("q", question, b) for b in range(rng.randint(*question_blocks)))
        visit[1] -= 1
        if visit[1] == 0:
            visit[0] = rng.randrange(num_docs)
            visit[1] = rng.randint(*questions_per_visit)
    return trace


def scan(
    seed: int = 0,
    scan_blocks: int = 15000,
    hot_blocks: int = 100,
    hot_fraction: float = 0.25,
) -> Trace:
    """A long one-pass scan interleaved with reads of a small hot set: LRU's worst case.

    Each access is, with probability ``hot_fraction``, a uniform pick among ``hot_blocks`` hot
    keys, else the next of ``scan_blocks`` keys that are read once and never again. Between two
    reads of one hot key come about ``hot_blocks * (1 - f) / f`` scan keys (``f`` the hot
    fraction; 300 by default), which push it out of an LRU smaller than that, while any policy
    that keeps the hot set (it fits) hits on about ``f`` of all accesses.
    """
    if not 0.0 <= hot_fraction < 1.0:
        raise ValueError(f"tokenvm: hot_fraction must be in [0, 1), got {hot_fraction}")
    rng = random.Random(seed)
    trace: Trace = []
    scanned = 0
    while scanned < scan_blocks:
        if rng.random() < hot_fraction:
            trace.append(_key("hot", rng.randrange(hot_blocks)))
        else:
            trace.append(_key("scan", scanned))
            scanned += 1
    return trace


TRACES: dict[str, Callable[[int], Trace]] = {
    "multi_turn_chat": multi_turn_chat,
    "shared_system_prompt": shared_system_prompt,
    "long_document_qa": long_document_qa,
    "scan": scan,
}
"""Every generator, by name; each takes the seed as its first argument."""


# -- simulation ------------------------------------------------------------------------------


_NONE = object()  # sentinel: "candidates() was empty" (None could be a valid key)


@dataclass(frozen=True)
class SimResult:
    """Outcome of one trace: ``hits + misses`` is the trace length."""

    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        """Hits over accesses, in [0, 1]; 0.0 for an empty trace."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def simulate(policy: EvictionPolicy, trace: Sequence[Hashable], capacity: int) -> SimResult:
    """Run ``trace`` through a tier of ``capacity`` slots ordered by ``policy``.

    Mirrors ``HostTier`` with nothing pinned: a hit calls ``touch``; a miss, when the tier is
    full, takes the first key of ``candidates()`` as victim and calls ``remove`` on it, then
    calls ``insert`` for the missing key. ``policy`` should be fresh (it is mutated).

    Raises ``RuntimeError`` if the policy offers no victim or a key that is not resident: that is
    a broken policy, and silently going on would make its numbers meaningless.
    """
    if capacity <= 0:
        raise ValueError(f"tokenvm: capacity must be > 0, got {capacity}")
    resident: set[Hashable] = set()
    # Bound methods hoisted out of the loop: this loop is the whole cost of a CLI run.
    touch, insert, remove, candidates = (
        policy.touch, policy.insert, policy.remove, policy.candidates)
    hits = 0
    for key in trace:
        if key in resident:
            hits += 1
            touch(key)
            continue
        if len(resident) >= capacity:
            victim = next(iter(candidates()), _NONE)
            if victim is _NONE or victim not in resident:
                raise RuntimeError(
                    f"tokenvm: {type(policy).__name__} offered victim {victim!r}, not resident")
            remove(victim)
            resident.discard(victim)
        insert(key)
        resident.add(key)
    return SimResult(hits=hits, misses=len(trace) - hits)


def belady(trace: Sequence[Hashable], capacity: int) -> int:
    """Optimal offline hit count (Belady's MIN) for ``trace`` in ``capacity`` slots.

    Demand paging, like ``simulate``: every missing key is inserted, and when full the resident
    key whose next use is farthest in the future (never, if it is not used again) is evicted. No
    policy driven by ``simulate`` can get more hits. O(n log n): a max-heap of next uses with
    lazy deletion of stale entries.
    """
    if capacity <= 0:
        raise ValueError(f"tokenvm: capacity must be > 0, got {capacity}")
    n = len(trace)
    # next_use[i]: the next position of trace[i] after i, or n + i if it is never used again.
    # Every value is distinct (a real position belongs to one access; n + i is unique), so heap
    # entries never tie and the keys themselves are never compared (they need not be ordered).
    next_use = [0] * n
    last: dict[Hashable, int] = {}
    for i in range(n - 1, -1, -1):
        key = trace[i]
        next_use[i] = last.get(key, n + i)
        last[key] = i
    resident: dict[Hashable, int] = {}  # key -> its current next use
    heap: list[tuple[int, Hashable]] = []  # (-next use, key); stale once the key moved on
    hits = 0
    for i, key in enumerate(trace):
        if key in resident:
            hits += 1
        elif len(resident) >= capacity:
            while True:
                neg_use, victim = heapq.heappop(heap)
                if resident.get(victim) == -neg_use:
                    break
            del resident[victim]
        resident[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], key))
    return hits


# -- CLI -------------------------------------------------------------------------------------


def run_table(
    traces: dict[str, Trace], capacities: Sequence[int]
) -> dict[int, dict[str, dict[str, float]]]:
    """Hit rates (0..1) as ``result[capacity][trace name][policy name or "belady"]``.

    Each policy is built with ``make_policy`` (no arguments), as the connector builds it.
    """
    result: dict[int, dict[str, dict[str, float]]] = {}
    for capacity in capacities:
        per_trace: dict[str, dict[str, float]] = {}
        for name, trace in traces.items():
            row = {policy: simulate(make_policy(policy), trace, capacity).hit_rate
                   for policy in POLICIES}
            row["belady"] = belady(trace, capacity) / len(trace) if trace else 0.0
            per_trace[name] = row
        result[capacity] = per_trace
    return result


def format_table(capacity: int, rows: dict[str, dict[str, float]],
                 lengths: dict[str, int]) -> str:
    """One capacity's table: a row per trace, a column per policy and Belady, in percent."""
    columns = [*POLICIES, "belady"]
    width = max(len(name) for name in rows)
    header = f"{'trace':<{width}}  {'accesses':>8}" + "".join(f"  {c:>11}" for c in columns)
    lines = [f"capacity {capacity} blocks: hit rate %", header, "-" * len(header)]
    for name, row in rows.items():
        lines.append(f"{name:<{width}}  {lengths[name]:>8}"
                     + "".join(f"  {100 * row[c]:>11.1f}" for c in columns))
    return "\n".join(lines)


def plot(results: dict[int, dict[str, dict[str, float]]], path: str) -> bool:
    """Write a grouped bar chart (one panel per capacity) to ``path``; False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede the pyplot import
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    columns = [*POLICIES, "belady"]
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 3.5 * len(results)), squeeze=False)
    for ax, (capacity, rows) in zip(axes[:, 0], results.items(), strict=True):
        names = list(rows)
        bar = 0.8 / len(columns)
        for j, column in enumerate(columns):
            xs = [i + (j - (len(columns) - 1) / 2) * bar for i in range(len(names))]
            ax.bar(xs, [100 * rows[n][column] for n in names], bar, label=column)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("hit rate %")
        ax.set_ylim(0, 118)  # headroom above 100 so the legend never hides a bar
        ax.set_yticks(range(0, 101, 20))
        ax.set_title(f"capacity {capacity} blocks")
        ax.legend(fontsize="small", ncols=len(columns), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m tokenvm_vllm.policies.simulator",
        description="Compare eviction policies and Belady's optimum on synthetic KV traces.")
    parser.add_argument("--capacity", type=int, nargs="+", default=[128, 512], metavar="N",
                        help="tier sizes in blocks, one table each (default: 128 512)")
    parser.add_argument("--seed", type=int, default=0, help="trace seed (default: 0)")
    parser.add_argument("--plot", metavar="OUT.png", help="also write a grouped bar chart")
    args = parser.parse_args(argv)
    if any(c <= 0 for c in args.capacity):
        parser.error("--capacity values must be > 0")
    started = time.perf_counter()
    traces = {name: gen(args.seed) for name, gen in TRACES.items()}
    lengths = {name: len(trace) for name, trace in traces.items()}
    results = run_table(traces, args.capacity)
    for capacity, rows in results.items():
        print(format_table(capacity, rows, lengths))
        print()
    print(f"seed {args.seed}; {time.perf_counter() - started:.1f} s")
    if args.plot:
        if plot(results, args.plot):
            print(f"wrote {args.plot}")
        else:
            print("note: matplotlib is not installed; no plot written "
                  "(pip install matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
