"""Read from the remote tier only when it beats recomputing (issue #15, ``remote_reads="auto"``).

On a fast GPU with a small model, one Redis server (~1-2 GB/s over loopback) delivers KV more
slowly than the engine recomputes it (an H200 prefills an 8B model at ~50k tok/s, ~6.5 GB/s of
KV): reading made TTFT p50 1.6 s against 0.55 s recomputing. On a CPU, a slow GPU or a big model
reading wins by far. ``RemoteGate`` measures both rates from the scheduler's own view and answers,
per request, whether to read its remote blocks.

Contract:

* Rates. ``read_rate``: remote values (blocks, one per KV cache group) read per second while
  any read is in flight (``reads_submitted`` -> ``reads_finished``; overlapping batches share the
  time, so it is the tier's throughput, not one batch's), summed over the last ``window``
  completions. ``compute_rate``: what one more token costs, from the engine's recent busy
  steps (``step_scheduled`` -> ``step_finished``: a step's time is from its schedule, or the
  previous step's end if later, to its end): step time = fixed cost + tokens / rate, fitted by
  least squares over the last ``steps_window`` steps. A step's fixed cost (tens of ms for
  an eager decode step of an 8B model: not measured here) is paid whether a prefix is read or
  not, so plain tokens/second would make recomputing look several times dearer than it is.
  Where the steps are too alike to fit (token counts within 2x or ``MIN_FIT_SPREAD_TOKENS``
  of each other, or a slope that is not positive) it falls back to tokens/second over the
  window, which errs towards reading; it is never below that. ``None`` until measured.
* ``should_read(values, tokens)``: while the read rate is unknown (cold start), True for one
  request at a time: the first asked since the last step was scheduled, when no read is in
  flight; the others recompute until that probe's reads end and so measure the tier. (Granting
  every cold request read, on the H200, a whole burst of 8 requests' prefixes at 764 blocks/s
  where recomputing ran at 86k tokens/s: TTFT p50 1.16 s against 0.56 s.) Once both rates are
  known: True when ``probe_interval_s`` passed since reads last went out or were last decided
  (a probe, one request's: the read rate is measured only while reading, so without it a skip
  would be for ever), or when ``values / read_rate < margin * tokens / compute_rate`` (a read
  rate of 0, every read in the window failed, never reads but by a probe). True while only the
  compute rate is unknown. Otherwise False: the caller recomputes.
* Time comes only from ``clock`` (``time.monotonic`` by default), so tests can drive it.
  Not thread safe: the scheduler calls it from its one thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

PROBE_INTERVAL_S = 10.0
"""Read anyway when no read went out for this long: the only way to see Redis get faster (or
the engine slower, e.g. under load) after a skip. A probe costs at most one request's TTFT."""
WINDOW = 32
"""Read completions (one per engine step that saw some) the read rate sums over."""
STEPS_WINDOW = 64
"""Busy engine steps the compute rate is fitted over."""
MIN_FIT_SPREAD_TOKENS = 64
"""Fit a slope only over steps whose token counts differ by this many at least: steps of 1 and
8 tokens (a tiny model on a CPU) take the same time give or take noise, and a slope from noise
could be near zero, i.e. recomputing nearly free."""


class RemoteGate:
    """Decides, per request, between reading its remote blocks and recomputing them."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        probe_interval_s: float = PROBE_INTERVAL_S,
        margin: float = 1.0,
        window: int = WINDOW,
        steps_window: int = STEPS_WINDOW,
    ) -> None:
        self.clock = clock
        self.probe_interval_s = probe_interval_s
        self.margin = margin
        """Read while the estimated read time is below ``margin`` x the recompute time."""
        self._steps: deque[tuple[float, int]] = deque()
        """Steps scheduled, not yet finished: (schedule time, tokens)."""
        self._last_step_end: float | None = None
        self._compute: deque[tuple[int, float]] = deque(maxlen=steps_window)
        self._reads_in_flight = 0
        self._reads_mark = 0.0
        """While reads are in flight: the last time read-busy time was accounted up to."""
        self._read_busy_s = 0.0
        """Read-busy time since the last completion (credited to the next one)."""
        self._reads: deque[tuple[int, float]] = deque(maxlen=window)
        self._last_read_sent: float | None = None
        self._cold_probe_granted = False
        """Cold start: a request was told to read since the last step went out (until its
        reads are submitted ``_reads_in_flight`` does not show them; ``step_scheduled``, which
        follows every ``reads_submitted``, clears it)."""

    # -- compute side ----------------------------------------------------------------------

    def step_scheduled(self, tokens: int) -> None:
        """A step of ``tokens`` tokens went to the workers. Steps of no token are not tracked
        (their end is still reported: ``step_finished`` ignores it)."""
        self._cold_probe_granted = False  # its reads, if any, were submitted just before
        if tokens > 0:
            self._steps.append((self.clock(), tokens))

    def step_finished(self) -> None:
        """The oldest step in flight ended (the workers' output for it arrived)."""
        now = self.clock()
        if self._steps:
            started, tokens = self._steps.popleft()
            if self._last_step_end is not None:
                started = max(started, self._last_step_end)  # pipelined: after the previous
            if now > started:
                self._compute.append((tokens, now - started))
        self._last_step_end = now

    @property
    def compute_rate(self) -> float | None:
        """Tokens per second one more token in a step costs (the fitted slope's inverse; see
        the module's contract); None before the first busy step."""
        average = _rate(self._compute)
        steps = self._compute
        if average is None or len(steps) < 4:
            return average
        low, high = min(n for n, _ in steps), max(n for n, _ in steps)
        if high < 2 * low or high - low < MIN_FIT_SPREAD_TOKENS:
            return average  # steps alike: no slope to see
        mean_n = sum(n for n, _ in steps) / len(steps)
        mean_s = sum(s for _, s in steps) / len(steps)
        covariance = sum((n - mean_n) * (s - mean_s) for n, s in steps)
        variance = sum((n - mean_n) ** 2 for n, _ in steps)
        if covariance <= 0:
            return average  # bigger steps no slower: noise, not a rate
        return max(average, variance / covariance)

    # -- read side -------------------------------------------------------------------------

    def reads_submitted(self, values: int) -> None:
        """``values`` remote reads went to the workers."""
        if values <= 0:
            return
        now = self.clock()
        self._account(now)
        self._reads_in_flight += values
        self._last_read_sent = now

    def reads_finished(self, values: int, delivered: int | None = None) -> None:
        """``values`` of the submitted reads were reported done, ``delivered`` of them (all by
        default) with their block: a read that expired in a queue or missed took the time and
        brought nothing (on the H200, 1,315 of server B's 3,419 reads)."""
        if values <= 0 or self._reads_in_flight <= 0:
            return
        self._account(self.clock())
        values = min(values, self._reads_in_flight)
        self._reads_in_flight -= values
        brought = values if delivered is None else max(0, min(delivered, values))
        self._reads.append((brought, self._read_busy_s))
        self._read_busy_s = 0.0

    def _account(self, now: float) -> None:
        if self._reads_in_flight:
            self._read_busy_s += now - self._reads_mark
        self._reads_mark = now

    @property
    def read_rate(self) -> float | None:
        """Remote values per second while reads were in flight; None before the first."""
        return _rate(self._reads)

    # -- decision --------------------------------------------------------------------------

    def should_read(self, values: int, tokens: int) -> bool:
        """Whether reading ``values`` remote values (``tokens`` tokens of prefix) is expected
        to be faster than recomputing those tokens (see the module's contract)."""
        read_rate, compute_rate = self.read_rate, self.compute_rate
        if read_rate is None:  # cold: one request reads, and so measures, at a time
            if self._reads_in_flight or self._cold_probe_granted:
                return False
            self._cold_probe_granted = True
            return True
        if compute_rate is None:
            return True
        now = self.clock()
        if self._last_read_sent is None or now - self._last_read_sent >= self.probe_interval_s:
            self._last_read_sent = now  # one probe: the requests decided with it recompute
            return True
        if read_rate <= 0:
            return False  # every read in the window brought nothing
        return values / read_rate < self.margin * tokens / compute_rate

    def describe(self) -> str:
        """Both rates, for a log line."""
        read_rate, compute_rate = self.read_rate, self.compute_rate
        return (f"remote reads {_fmt(read_rate)} blocks/s, recompute {_fmt(compute_rate)} "
                f"tokens/s")


def _rate(observations: deque[tuple[int, float]]) -> float | None:
    seconds = sum(s for _, s in observations)
    if not observations or seconds <= 0:
        return None
    return sum(n for n, _ in observations) / seconds


def _fmt(rate: float | None) -> str:
    return "unmeasured" if rate is None else f"{rate:,.0f}"
