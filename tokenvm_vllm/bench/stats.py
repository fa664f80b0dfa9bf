"""Small statistics shared by the benchmarks."""

from __future__ import annotations

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
