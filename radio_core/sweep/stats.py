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


# --------------------------------------------------------------------------- judging an effect


def paired_values(a: Mapping[object, float], b: Mapping[object, float]) -> list[float]:
    """``a[s] - b[s]`` over the seeds both have (in ``a``'s order)."""
    return [a[s] - b[s] for s in a if s is not None and s in b]


def minimum_detectable_effect(sd: float, n: int, level: float = LEVEL, power: float = 0.8) -> Optional[float]:
    """The smallest true mean difference that a two-sided paired t-test at ``level`` detects with
    probability ``power``, from n paired differences of standard deviation ``sd``: solved exactly
    on the noncentral t distribution (noncentrality = effect * sqrt(n) / sd)."""
    if n < 2 or not math.isfinite(sd):
        return None
    if sd == 0:
        return 0.0
    from scipy.optimize import brentq
    from scipy.stats import nct

    df = n - 1
    crit = t_quantile(df, level)

    def shortfall(effect: float) -> float:
        ncp = effect * math.sqrt(n) / sd
        return float(nct.sf(crit, df, ncp) + nct.cdf(-crit, df, ncp)) - power

    hi = sd
    for _ in range(60):
        value = shortfall(hi)
        if not math.isfinite(value):
            return None  # the noncentral t is not computable here (tiny df, extreme level)
        if value >= 0:
            break
        hi *= 2
    try:
        return float(brentq(shortfall, 0.0, hi, xtol=1e-12 * max(sd, 1e-300)))
    except ValueError:
        return None


@dataclass
class Judgement:
    """One paired comparison judged against a smallest effect of interest ``margin`` (> 0).

    ``interval`` is the two-sided ``level`` t-interval of the mean difference; ``tost`` the
    ``1 - 2 (1 - level)`` one (90% for 95%), whose inclusion in (-margin, +margin) is the two
    one-sided tests' equivalence at ``1 - level``."""

    interval: Interval
    tost: Interval
    margin: Optional[float]
    mde: Optional[float]
    level: float
    min_n: int

    @property
    def enough(self) -> bool:
        return self.interval.n >= self.min_n and self.interval.half is not None

    @property
    def direction(self) -> str:
        """higher | lower | none: whether the interval excludes 0."""
        if not self.enough:
            return "none"
        if self.interval.low > 0:
            return "higher"
        if self.interval.high < 0:
            return "lower"
        return "none"

    @property
    def equivalent(self) -> bool:
        """Equivalent within +-margin (two one-sided tests)."""
        return bool(self.enough and self.margin is not None
                    and -self.margin < self.tost.low and self.tost.high < self.margin)

    def verdict(self, claim: str) -> str:
        """``claim``: ``higher`` (the first arm is better), ``not_worse`` (no worse than by the
        margin: non-inferiority) or ``equivalent``. Returns one of: ``reproduced``, ``not
        reproduced (reversed)``, ``not reproduced (equivalent within the margin)``, ``not
        reproduced (worse by more than the margin)``, ``inconclusive``, ``no verdict (n < N)``."""
        if not self.enough:
            return f"no verdict (n = {self.interval.n} < {self.min_n})"
        lo, hi = self.interval.low, self.interval.high
        if claim == "higher":
            if self.direction == "higher":
                return "reproduced"
            if self.direction == "lower":
                return "not reproduced (reversed)"
            if self.equivalent:
                return "not reproduced (equivalent within the margin)"
            return "inconclusive"
        if self.margin is None:
            raise ValueError(f"claim {claim!r} needs a margin")
        if claim == "not_worse":
            if lo > -self.margin:
                return "reproduced"
            if hi < -self.margin:
                return "not reproduced (worse by more than the margin)"
            return "inconclusive"
        if claim == "equivalent":
            if self.equivalent:
                return "reproduced"
            if lo > self.margin or hi < -self.margin:
                return "not reproduced (differs by more than the margin)"
            return "inconclusive"
        raise ValueError(f"unknown claim {claim!r} (higher, not_worse, equivalent)")


def judge(differences: list[float], margin: Optional[float], level: float = LEVEL, min_n: int = 5) -> Judgement:
    """Judge paired differences (one per seed) against the smallest effect of interest."""
    if not differences:
        empty = Interval(float("nan"), None, 0)
        return Judgement(empty, empty, margin, None, level, min_n)
    interval = mean_ci(differences, level)
    tost = mean_ci(differences, 1 - 2 * (1 - level))
    sd = statistics.stdev(differences) if len(differences) > 1 else float("nan")
    return Judgement(interval, tost, margin, minimum_detectable_effect(sd, len(differences), level), level, min_n)


def difference_in_differences(a_first: Mapping[object, float], a_second: Mapping[object, float],
                              b_first: Mapping[object, float], b_second: Mapping[object, float]) -> list[float]:
    """Per seed ``(a_first - a_second) - (b_first - b_second)``, over the seeds all four share:
    e.g. the 64 -> 128 px drop of the split schedule minus that of every-teacher-at-both."""
    seeds = [s for s in a_first if s is not None and all(s in m for m in (a_second, b_first, b_second))]
    return [(a_first[s] - a_second[s]) - (b_first[s] - b_second[s]) for s in seeds]
