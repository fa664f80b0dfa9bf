"""RemoteGate (issue #15): read remote blocks only while that beats recomputing them. A fake
clock drives every measurement, so each rate and decision below is exact."""

from __future__ import annotations

import pytest

from tokenvm_vllm.policies.remote_gate import RemoteGate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def steps(gate: RemoteGate, clock: Clock, count: int, tokens: int, seconds: float) -> None:
    """``count`` back-to-back steps of ``tokens`` tokens, ``seconds`` each."""
    for _ in range(count):
        gate.step_scheduled(tokens)
        clock.now += seconds
        gate.step_finished()


def read(gate: RemoteGate, clock: Clock, values: int, seconds: float) -> None:
    gate.reads_submitted(values)
    clock.now += seconds
    gate.reads_finished(values)


def test_cold_start_reads() -> None:
    clock = Clock()
    gate = RemoteGate(clock=clock)
    assert gate.read_rate is None and gate.compute_rate is None
    assert gate.should_read(100, 1600)  # nothing measured
    steps(gate, clock, 4, tokens=1000, seconds=0.01)  # 100k tok/s
    assert gate.compute_rate == pytest.approx(100_000)
    assert gate.should_read(100, 1600)  # reads still unmeasured: read (and so measure)


def test_cold_start_reads_one_request_at_a_time() -> None:
    """Before the first read is measured only one request reads; the others recompute until
    its reads end (a burst of 8 requests all reading at 764 blocks/s doubled TTFT on an H200)."""
    clock = Clock()
    gate = RemoteGate(clock=clock)
    assert gate.should_read(256, 4096)  # the probe
    assert not gate.should_read(256, 4096)  # same step, its reads not yet submitted
    gate.reads_submitted(256)
    gate.step_scheduled(4096)
    assert not gate.should_read(256, 4096)  # the probe's reads are in flight
    clock.now += 0.1
    gate.step_finished()
    assert not gate.should_read(256, 4096)
    clock.now += 0.2
    gate.reads_finished(256)  # 256 blocks in 0.3 s: 853 blocks/s against ~41k tok/s
    assert gate.read_rate == pytest.approx(256 / 0.3)
    assert not gate.should_read(256, 4096)  # measured: slower than recomputing
    assert gate.should_read(1, 4096)  # ~1 ms reading against ~100 ms recomputing

    # A probe granted but never submitted (nothing to read after all) holds only its step.
    idle = RemoteGate(clock=clock)
    assert idle.should_read(8, 128)
    assert not idle.should_read(8, 128)
    idle.step_scheduled(0)
    assert idle.should_read(8, 128)


def test_reads_that_all_failed_are_not_read_but_probed() -> None:
    """Every read in the window expired (delivered nothing): read rate 0, no division by it;
    recompute, and probe again after ``probe_interval_s``."""
    clock = Clock()
    gate = RemoteGate(clock=clock, probe_interval_s=10.0)
    steps(gate, clock, 4, tokens=1000, seconds=0.01)
    gate.reads_submitted(64)
    clock.now += 0.5
    gate.reads_finished(64, delivered=0)
    assert gate.read_rate == 0
    assert not gate.should_read(1, 4096)
    clock.now += 10
    assert gate.should_read(1, 4096)  # the probe
    assert "0 blocks/s" in gate.describe()


def test_slow_reads_skip_and_fast_reads_read() -> None:
    clock = Clock()
    gate = RemoteGate(clock=clock)
    steps(gate, clock, 4, tokens=1000, seconds=0.01)  # 100k tok/s
    read(gate, clock, 100, 1.0)  # 100 blocks/s = 1,600 tok/s of 16-token blocks
    assert gate.read_rate == pytest.approx(100)
    assert not gate.should_read(100, 1600)  # 1 s reading against 16 ms recomputing
    assert "100 blocks/s" in gate.describe() and "100,000 tokens/s" in gate.describe()

    fast = RemoteGate(clock=clock)
    steps(fast, clock, 4, tokens=100, seconds=0.1)  # 1,000 tok/s (a CPU)
    read(fast, clock, 100, 0.05)  # 2,000 blocks/s
    assert fast.should_read(100, 1600)  # 50 ms reading against 1.6 s recomputing


def test_probe_after_interval_measures_again() -> None:
    clock = Clock()
    gate = RemoteGate(clock=clock, probe_interval_s=10.0)
    steps(gate, clock, 4, tokens=1000, seconds=0.01)
    read(gate, clock, 10, 1.0)  # slow: 10 blocks/s
    clock.now += 5
    assert not gate.should_read(100, 1600)
    clock.now += 5  # 10 s since the last read went out: probe
    assert gate.should_read(100, 1600)
    assert not gate.should_read(100, 1600)  # one request probes, the next one recomputes
    # The probe finds the tier fast now; the window's sum moves to it as reads go on.
    for _ in range(40):
        read(gate, clock, 100, 0.01)  # 10,000 blocks/s
    assert gate.read_rate == pytest.approx(10_000)
    assert gate.should_read(100, 1600)  # 10 ms reading against 16 ms recomputing


def test_overlapping_reads_measure_throughput_not_latency() -> None:
    clock = Clock()
    gate = RemoteGate(clock=clock)
    gate.reads_submitted(100)
    gate.reads_submitted(100)  # both in flight at once for 1 s: 200 blocks/s
    clock.now += 1.0
    gate.reads_finished(200)
    assert gate.read_rate == pytest.approx(200)
    clock.now += 50  # idle: no read in flight, not counted
    read(gate, clock, 200, 1.0)
    assert gate.read_rate == pytest.approx(200)


def test_compute_rate_is_the_marginal_cost_of_a_token() -> None:
    """Issue #15's server B: only 128-token suffixes and decodes to compute. Say an 8-sequence
    decode step takes 25 ms, a step with a suffix 28 ms: a token costs 3 ms / 128, ~43k tok/s
    (what recomputing a prefix would cost), not the 2.3k tok/s of tokens over time."""
    clock = Clock()
    gate = RemoteGate(clock=clock)
    for _ in range(10):
        steps(gate, clock, 1, tokens=8 + 128, seconds=0.028)
        steps(gate, clock, 5, tokens=8, seconds=0.025)
    assert gate.compute_rate == pytest.approx(128 / 0.003)
    # 2 MiB blocks of 16 tokens at ~1.5 GB/s: 700 blocks/s, 11k tok/s: recompute
    read(gate, clock, 700, 1.0)
    assert not gate.should_read(256, 4096)
    # a plain tokens/second (2.3k tok/s) would have read
    assert 256 / 700 < 4096 / ((10 * 136 + 50 * 8) / (10 * 0.028 + 50 * 0.025))


def test_compute_rate_falls_back_to_tokens_per_second() -> None:
    clock = Clock()
    gate = RemoteGate(clock=clock)
    steps(gate, clock, 4, tokens=1000, seconds=0.01)  # alike steps: no slope
    assert gate.compute_rate == pytest.approx(100_000)
    clock.now += 100  # idle between steps: the next step is timed from its schedule
    gate.step_finished()  # the end of a step of no tokens: nothing to pop
    steps(gate, clock, 4, tokens=3000, seconds=0.01)  # bigger, no slower: noise, not a slope
    assert gate.compute_rate == pytest.approx(16_000 / 0.08)
    # 1- and 8-token steps (a tiny model on a CPU): too close to fit a slope from; the noise
    # here would say a token costs 1 us, recomputing ~free
    small = RemoteGate(clock=clock)
    for _ in range(10):
        steps(small, clock, 1, tokens=8, seconds=0.020007)
        steps(small, clock, 5, tokens=1, seconds=0.02)
    assert small.compute_rate == pytest.approx(130 / (10 * 0.020007 + 50 * 0.02))
    # Pipelined (async scheduling): the next step is scheduled before the previous ends; its
    # time runs from the previous one's end.
    pipelined = RemoteGate(clock=clock)
    pipelined.step_scheduled(1000)
    pipelined.step_scheduled(1000)
    clock.now += 0.01
    pipelined.step_finished()
    clock.now += 0.01
    pipelined.step_finished()
    assert pipelined.compute_rate == pytest.approx(100_000)


def test_margin_and_ties() -> None:
    clock = Clock()
    gate = RemoteGate(clock=clock, margin=2.0)
    steps(gate, clock, 1, tokens=1600, seconds=1.0)  # 1,600 tok/s
    read(gate, clock, 50, 1.0)  # 50 blocks/s: 100 blocks take 2 s, recomputing 1 s
    assert not gate.should_read(100, 1600)  # 2 s is not below 2 x 1 s
    assert gate.should_read(99, 1600)


def test_failed_reads_take_time_and_bring_nothing() -> None:
    """Reads that expired in a queue or missed are finished (nothing is left in flight) but
    bring no block: the time they took lowers the read rate, and once they are done no more
    busy time accrues."""
    clock = Clock()
    gate = RemoteGate(clock=clock)
    gate.reads_submitted(100)
    clock.now += 1.0
    gate.reads_finished(100, delivered=40)  # 60 expired
    assert gate.read_rate == pytest.approx(40)
    clock.now += 100.0  # idle: no read in flight, so no busy time
    gate.reads_submitted(10)
    clock.now += 0.1
    gate.reads_finished(10)
    assert gate.read_rate == pytest.approx(50 / 1.1)
