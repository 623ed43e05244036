"""Means with 95% confidence intervals, and verdicts decided by them (never by reading the means alone).

Runs of one configuration over seeds give a t-interval. Two methods run on common seeds are compared by
their per-seed differences (a paired t-interval): a seed fixes the prompt order, the held-out problems and
the evaluation's sampling seed for every method, so what the seeds share cancels in the difference. A
comparison against a single model (a teacher, an ExPO merge: one checkpoint) adds that model's binomial
sampling error to the runs' spread (Welch-Satterthwaite degrees of freedom).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# 97.5% quantiles of Student's t by degrees of freedom (no scipy needed). A fractional or missing df uses
# the next smaller tabulated one, which is wider: the intervals err on the side of "inconclusive".
_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
          12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile(degrees: float) -> float:
    if degrees < 1:
        return math.inf
    if degrees > 120:
        return 1.96
    return _T_975[max(d for d in _T_975 if d <= degrees)]


@dataclass(frozen=True, kw_only=True, slots=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int  # seeds

    def format(self, percent: bool = True) -> str:
        scale, digits = (100.0, 1) if percent else (1.0, 3)
        if self.n < 2 or not math.isfinite(self.high - self.low):
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {(self.high - self.mean) * scale:.{digits}f}"


def _sample_variance(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    return sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else math.inf


def _welch(mean: float, parts: list[tuple[float, float]], n: int) -> Interval:
    """Interval of `mean` whose variance is a sum of parts (variance of the mean, its degrees of freedom);
    Welch-Satterthwaite gives the degrees of freedom of the sum (a part known exactly has infinite df)."""
    total = sum(v for v, _ in parts)
    if not math.isfinite(total):
        return Interval(mean=mean, low=-math.inf, high=math.inf, n=n)
    spread = sum(v * v / df for v, df in parts if math.isfinite(df) and df > 0)
    degrees = total * total / spread if spread > 0 else math.inf
    half = t_quantile(degrees) * math.sqrt(total)
    return Interval(mean=mean, low=mean - half, high=mean + half, n=n)


def interval(values: list[float], extra_variance: float = 0.0) -> Interval:
    """95% t-interval of the mean of `values` (one per seed), widened by `extra_variance` (a variance of the
    mean known without estimation, e.g. binomial sampling error)."""
    n = len(values)
    parts = [(_sample_variance(values) / n, n - 1), (extra_variance, math.inf)]
    return _welch(sum(values) / n, parts, n)


def binomial_variance(accuracy: float, count: int) -> float:
    """Variance of an accuracy measured on `count` graded samples."""
    return accuracy * (1 - accuracy) / count


def difference(values: list[float], other: float, other_count: int = 0, *, other_variance: float | None = None) -> Interval:
    """Interval of mean(values) - other, `other` a single model's accuracy measured on `other_count` graded
    samples (its binomial variance), or with `other_variance` given outright (e.g. a mean of two domains)."""
    if other_variance is None:
        other_variance = binomial_variance(other, other_count) if other_count else 0.0
    return interval([v - other for v in values], extra_variance=other_variance)


def paired_difference(values: dict[int, float], other: dict[int, float]) -> Interval:
    """Interval of the mean per-seed difference values[seed] - other[seed] over the seeds both have (a
    paired t-interval, n - 1 degrees of freedom); `n` of the result is the number of pairs."""
    seeds = sorted(set(values) & set(other))
    if not seeds:
        raise ValueError(f"no common seeds to pair: {sorted(values)} vs {sorted(other)}")
    return interval([values[seed] - other[seed] for seed in seeds])


def verdict_greater(diff: Interval) -> str:
    """The finding says 'greater': reproduced iff the whole interval is above 0."""
    if diff.low > 0:
        return "reproduced"
    if diff.high < 0:
        return "not reproduced"
    return "inconclusive"


def verdict_equal(diff: Interval, margin: float) -> str:
    """The finding says 'about equal': reproduced iff the interval lies within +-margin."""
    if -margin <= diff.low and diff.high <= margin:
        return "reproduced"
    if diff.high < -margin or diff.low > margin:
        return "not reproduced"
    return "inconclusive"
