"""Means with 95% confidence intervals, and verdicts decided by them (never by reading the means alone).

Runs of one configuration over seeds give a t-interval. Every comparison is paired: two methods run on
common seeds are compared by their per-seed differences (a paired t-interval), since a seed fixes the
prompt order, the training draws and the evaluation's sampling seed for every method, so what the seeds
share cancels in the difference. A single model (a teacher, a base, an ExPO merge: one checkpoint) is
sampled with every seed's evaluation seed, so it pairs the same way and its sampling error is part of the
differences' spread.
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


def interval(values: list[float]) -> Interval:
    """95% t-interval of the mean of `values` (one per seed), n - 1 degrees of freedom."""
    n = len(values)
    mean = sum(values) / n
    variance = _sample_variance(values) / n
    if not math.isfinite(variance):
        return Interval(mean=mean, low=-math.inf, high=math.inf, n=n)
    half = t_quantile(n - 1) * math.sqrt(variance)
    return Interval(mean=mean, low=mean - half, high=mean + half, n=n)


def paired_difference(values: dict[int, float], other: dict[int, float]) -> Interval:
    """Interval of the mean per-seed difference values[seed] - other[seed] over the seeds both have (a
    paired t-interval, n - 1 degrees of freedom); `n` of the result is the number of pairs."""
    seeds = sorted(set(values) & set(other))
    if not seeds:
        raise ValueError(f"no common seeds to pair: {sorted(values)} vs {sorted(other)}")
    return interval([values[seed] - other[seed] for seed in seeds])


def verdict_greater(diff: Interval, paper_gain: float = 0.0) -> str:
    """The finding says 'greater': reproduced iff the whole interval is above 0; not reproduced iff the whole
    interval is below `paper_gain`, the gain the paper reports for this comparison (a gain as large as the
    paper's is excluded, though a smaller one may remain); inconclusive otherwise. A finding with no number
    in the paper (0) is not reproduced only when its interval is wholly below 0."""
    if diff.low > 0:
        return "reproduced"
    if diff.high < paper_gain:
        return "not reproduced"
    return "inconclusive"


def verdict_equal(diff: Interval, margin: float) -> str:
    """The finding says 'about equal': reproduced iff the interval lies within +-margin."""
    if -margin <= diff.low and diff.high <= margin:
        return "reproduced"
    if diff.high < -margin or diff.low > margin:
        return "not reproduced"
    return "inconclusive"
