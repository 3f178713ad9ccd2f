"""Means with Student-t 95% confidence intervals, and differences between two arms' seeds.

Seeds shared by both arms are paired (same seed = same initialisation and data order, so the
per-seed difference removes that noise); otherwise Welch's interval for unequal variances.
A difference is *resolved* when its interval excludes 0, *inconclusive* otherwise.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Optional

LEVEL = 0.95


def t_quantile(df: float, level: float = LEVEL) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


@dataclass
class Interval:
    mean: float
    #: half-width of the interval; None with fewer than two values.
    half: Optional[float]
    n: int

    @property
    def low(self) -> Optional[float]:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> Optional[float]:
        return None if self.half is None else self.mean + self.half

    def text(self) -> str:
        if self.half is None:
            return f"{self.mean:.4g} (n={self.n})"
        return f"{self.mean:.4g} ± {self.half:.2g}"


def mean_ci(values: list[float], level: float = LEVEL) -> Interval:
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, None, n)
    return Interval(mean, t_quantile(n - 1, level) * statistics.stdev(values) / math.sqrt(n), n)


@dataclass
class Difference:
    #: arm minus baseline.
    interval: Interval
    paired: bool

    @property
    def verdict(self) -> str:
        lo, hi = self.interval.low, self.interval.high
        if lo is None or not (lo > 0 or hi < 0):
            return "inconclusive"
        return "resolved (higher)" if lo > 0 else "resolved (lower)"

    @property
    def resolved(self) -> bool:
        return self.verdict.startswith("resolved")


def difference(arm: Mapping[object, float], baseline: Mapping[object, float], level: float = LEVEL) -> Difference:
    """``arm - baseline``; both map seed -> value (a seed of None is never paired)."""
    common = [s for s in arm if s is not None and s in baseline]
    if len(common) >= 2 and len(common) == len(arm) == len(baseline):
        return Difference(mean_ci([arm[s] - baseline[s] for s in common], level), paired=True)
    a, b = list(arm.values()), list(baseline.values())
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(Interval(diff, None, min(len(a), len(b))), paired=False)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(Interval(diff, 0.0, min(len(a), len(b))), paired=False)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    return Difference(Interval(diff, t_quantile(df, level) * se, min(len(a), len(b))), paired=False)
