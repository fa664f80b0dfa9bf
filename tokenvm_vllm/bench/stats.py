"""Small statistics shared by the benchmarks."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (``q`` in [0, 1]) of a non-empty ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def median_by_quarter(values: Sequence[float]) -> list[float]:
    """The median of each quarter of ``values`` in their order (requests in arrival order:
    does the start of a burst wait longer than the rest?). Fewer than 4 values: one median
    per value."""
    if not values:
        return []
    n = len(values)
    parts = [values[i * n // 4:(i + 1) * n // 4] for i in range(4)] if n >= 4 else \
        [[v] for v in values]
    return [statistics.median(part) for part in parts]


def queue_by_second(start_s: Sequence[float], first_token_s: Sequence[float],
                    end_s: Sequence[float], sample_s: float = 0.05) -> list[tuple[float, float]]:
    """For each whole second from the first request sent to the last one done: the mean number
    of requests *waiting* (sent, no first token yet) and *decoding* (first token seen, not yet
    done), sampled every ``sample_s``. The three lists hold one request each, on one clock.

    Under Poisson arrivals this is where a TTFT tail comes from: the requests that arrive while
    the waiting count peaks wait behind all of it, and the decoding count is bounded by what the
    GPU KV cache holds at once. It needs only the client's own times, so it reads the same for
    any server, native included."""
    if not start_s:
        return []
    origin = min(start_s)
    horizon = max(end_s) - origin
    requests = list(zip(start_s, first_token_s, end_s, strict=True))
    rows: list[tuple[float, float]] = []
    for second in range(math.ceil(horizon)):
        # sample midpoints; a last, partial second has fewer of them
        times = [origin + t for t in (second + (k + 0.5) * sample_s
                                      for k in range(math.ceil(1 / sample_s)))
                 if t < min(second + 1, horizon)]
        if times:
            waiting = sum(s <= now < f for now in times for s, f, _ in requests)
            decoding = sum(f <= now < e for now in times for _, f, e in requests)
            rows.append((waiting / len(times), decoding / len(times)))
    return rows
