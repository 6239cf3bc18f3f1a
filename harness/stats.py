"""Paired statistics over seeds: the mean difference, its sample standard deviation and a Student-t confidence
interval, as pure functions of the per-seed differences."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (standard tables, 4 decimals).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959964  # the standard normal's 0.975 quantile


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom: the table up to 30, beyond it the
    Cornish-Fisher expansion around the normal quantile (within 1e-4 of the exact value there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Paired:
    """Per-seed differences a - b and what they say."""

    diffs: tuple[float, ...]
    mean: float
    sd: float | None  # sample standard deviation (n - 1); None for n = 1
    low: float | None  # 95% Student-t confidence interval of the mean difference; None for n = 1
    high: float | None

    @property
    def n(self) -> int:
        return len(self.diffs)

    def verdict(self) -> str:
        """The interval in words."""
        if self.low is None:
            return f"n = {self.n}: no interval (at least 2 paired seeds are needed)"
        if self.low <= 0 <= self.high:
            return f"the interval contains 0: no difference detected at n = {self.n}"
        side = "higher" if self.mean > 0 else "lower"
        return f"the interval excludes 0: {side} by {abs(self.mean):.2f} points on average at n = {self.n}"


def paired(diffs) -> Paired:
    diffs = tuple(float(d) for d in diffs)
    if not diffs:
        raise ValueError("no paired seeds")
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return Paired(diffs, mean, None, None, None)
    sd = statistics.stdev(diffs)
    half = t975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Paired(diffs, mean, sd, mean - half, mean + half)
