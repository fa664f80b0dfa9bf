"""The trace simulator: hand-computed LRU runs, Belady's optimum, generated traces, the CLI."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path

import pytest

from tokenvm_vllm.policies import POLICIES, LRUPolicy, make_policy
from tokenvm_vllm.policies import simulator as sim
from tokenvm_vllm.policies.base import EvictionPolicy
from tokenvm_vllm.policies.simulator import (
    TRACES,
    SimResult,
    Trace,
    belady,
    long_document_qa,
    multi_turn_chat,
    scan,
    shared_system_prompt,
    simulate,
)

# The classic textbook reference string (Silberschatz et al., "Operating System Concepts"):
# with 3 frames, OPT takes 9 faults and LRU 12, out of 20 references.
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]
# Belady's anomaly string: OPT takes 7 faults with 3 frames, 6 with 4.
ANOMALY = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]


# Small versions of every generator, so the property tests stay quick.
SMALL_TRACES: dict[str, Callable[[int], Trace]] = {
    "multi_turn_chat": lambda seed: multi_turn_chat(seed, num_conversations=40, concurrent=8),
    "shared_system_prompt": lambda seed: shared_system_prompt(seed, num_requests=200),
    "long_document_qa": lambda seed: long_document_qa(seed, num_questions=60),
    "scan": lambda seed: scan(seed, scan_blocks=3000),
}


# -- simulate --------------------------------------------------------------------------------


def test_simulate_lru_hand_computed() -> None:
    # cap 2: a- b- a+ c-(evicts b) b-(evicts a) a-(evicts c)
    assert simulate(LRUPolicy(), list("abacba"), 2) == SimResult(hits=1, misses=5)
    # cap 3: a- b- c- a+ d-(evicts b) a+ c+ b-(evicts d)
    assert simulate(LRUPolicy(), list("abcadacb"), 3) == SimResult(hits=3, misses=5)


def test_simulate_lru_textbook() -> None:
    result = simulate(LRUPolicy(), TEXTBOOK, 3)
    assert (result.hits, result.misses) == (8, 12)
    assert result.hit_rate == pytest.approx(0.4)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_simulate_without_pressure_misses_only_first_uses(name: str) -> None:
    trace = list("abcabcaaab")
    assert simulate(make_policy(name), trace, 3) == SimResult(hits=7, misses=3)
    assert belady(trace, 3) == 7


def test_sim_result_hit_rate() -> None:
    assert SimResult(hits=3, misses=1).hit_rate == 0.75
    assert SimResult(hits=0, misses=0).hit_rate == 0.0
    assert simulate(LRUPolicy(), [], 4) == SimResult(hits=0, misses=0)


class _Broken(LRUPolicy):
    """Offers a key that was never inserted."""

    def candidates(self) -> Iterator[Hashable]:
        return iter([b"ghost"])


class _Empty(LRUPolicy):
    """Offers no victim at all."""

    def candidates(self) -> Iterator[Hashable]:
        return iter([])


@pytest.mark.parametrize("policy", [_Broken(), _Empty()])
def test_simulate_rejects_a_broken_policy(policy: EvictionPolicy) -> None:
    with pytest.raises(RuntimeError, match="not resident"):
        simulate(policy, list("abc"), 2)


def test_bad_capacity() -> None:
    with pytest.raises(ValueError):
        simulate(LRUPolicy(), list("ab"), 0)
    with pytest.raises(ValueError):
        belady(list("ab"), 0)


# -- belady ----------------------------------------------------------------------------------


def test_belady_textbook() -> None:
    assert belady(TEXTBOOK, 3) == 20 - 9


@pytest.mark.parametrize(("capacity", "faults"), [(3, 7), (4, 6)])
def test_belady_anomaly_string(capacity: int, faults: int) -> None:
    assert belady(ANOMALY, capacity) == len(ANOMALY) - faults


def _best_hits(trace: Sequence[Hashable], capacity: int) -> int:
    """Exhaustive optimum over every eviction choice (tiny traces only)."""

    def go(i: int, resident: frozenset[Hashable]) -> int:
        if i == len(trace):
            return 0
        key = trace[i]
        if key in resident:
            return 1 + go(i + 1, resident)
        if len(resident) < capacity:
            return go(i + 1, resident | {key})
        return max(go(i + 1, (resident - {victim}) | {key}) for victim in resident)

    return go(0, frozenset())


@pytest.mark.parametrize("seed", range(12))
def test_belady_matches_exhaustive_search(seed: int) -> None:
    rng = random.Random(seed)
    trace = [rng.randrange(5) for _ in range(11)]
    for capacity in (1, 2, 3):
        assert belady(trace, capacity) == _best_hits(trace, capacity), (trace, capacity)


def test_belady_keys_need_not_be_ordered() -> None:
    # Heap entries must never fall back to comparing keys: objects() are unorderable.
    a, b, c = object(), object(), object()
    assert belady([a, b, c, a, b, c, a], 2) == belady([0, 1, 2, 0, 1, 2, 0], 2) == 2


# -- generated traces ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TRACES))
def test_generators_are_deterministic(name: str) -> None:
    trace = SMALL_TRACES[name](7)
    assert trace == SMALL_TRACES[name](7)
    assert trace != SMALL_TRACES[name](8)
    assert len(trace) > 1000 and all(isinstance(key, bytes) for key in trace)
    assert len(set(trace)) < len(trace)  # there is reuse to exploit


def test_multi_turn_chat_rereads_the_prefix() -> None:
    trace = multi_turn_chat(0, num_conversations=1, concurrent=1, turns=(3, 3),
                            first_blocks=(2, 2), blocks_per_turn=(1, 1))
    c = [b"chat/0/%d" % i for i in range(4)]
    # turn 1 writes 2 blocks; turn 2 reads them, writes 1; turn 3 reads 3, writes 1.
    assert trace == [c[0], c[1], c[0], c[1], c[2], c[0], c[1], c[2], c[3]]


@pytest.mark.parametrize("name", sorted(TRACES))
@pytest.mark.parametrize("capacity", [16, 64, 256])
def test_belady_bounds_every_policy(name: str, capacity: int) -> None:
    trace = SMALL_TRACES[name](0)
    best = belady(trace, capacity)
    for policy in POLICIES:
        hits = simulate(make_policy(policy), trace, capacity).hits
        assert hits <= best, (policy, hits, best)
    assert best <= len(trace) - len(set(trace))  # first uses always miss


def test_scan_is_lru_worst_case() -> None:
    trace = scan(0, scan_blocks=5000)  # 100 hot keys, 25% of accesses
    capacity = 128  # holds the hot set, not the ~300 scan keys between its reuses
    lru = simulate(LRUPolicy(), trace, capacity).hit_rate
    best = belady(trace, capacity) / len(trace)
    assert best > 0.2
    assert lru < 0.5 * best
    for name in ("2q", "arc"):  # the scan-resistant policies get close to the optimum
        assert simulate(make_policy(name), trace, capacity).hit_rate > 0.8 * best, name


# -- CLI -------------------------------------------------------------------------------------


@pytest.fixture
def small_traces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sim, "TRACES", SMALL_TRACES)


@pytest.mark.usefixtures("small_traces")
def test_cli_prints_one_table_per_capacity(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim.main(["--capacity", "16", "64", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "capacity 16 blocks" in out and "capacity 64 blocks" in out
    header = next(line for line in out.splitlines() if line.startswith("trace"))
    assert header.split()[2:] == [*POLICIES, "belady"]
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["scan"]]
    assert len(rows) == 2
    trace = SMALL_TRACES["scan"](3)
    assert int(rows[0][1]) == len(trace)
    assert float(rows[0][-1]) == pytest.approx(100 * belady(trace, 16) / len(trace), abs=0.05)


@pytest.mark.usefixtures("small_traces")
def test_cli_plot_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for module in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes "import matplotlib" fail
    out_png = tmp_path / "out.png"
    assert sim.main(["--capacity", "16", "--plot", str(out_png)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not out_png.exists()


@pytest.mark.usefixtures("small_traces")
def test_cli_plot_with_matplotlib(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out_png = tmp_path / "out.png"
    assert sim.main(["--capacity", "16", "64", "--plot", str(out_png)]) == 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_capacity() -> None:
    with pytest.raises(SystemExit):
        sim.main(["--capacity", "0"])


def test_small_traces_cover_every_generator() -> None:
    assert set(SMALL_TRACES) == set(TRACES)
