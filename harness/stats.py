"""Paired statistics over seeds: the mean difference, its sample standard deviation and a Student-t confidence
interval (scipy.stats), as pure functions of the per-seed differences."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return float(stats.t.ppf(0.975, df))


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
