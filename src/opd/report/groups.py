"""metrics.jsonl's keys sorted into the report's plots: one `MetricGroup` per plot, by key prefix.

The rules below name the groups a reader looks for first (teacher KL, implicit reward per domain, length,
truncation, entropy, grad norm, IS weights, sampler gap, async staleness, trust/outliers, guidance,
evaluation, perf); every key no rule takes falls into a group named after its first path segment, so every
logged metric is drawn somewhere.
Keys whose values differ in scale (token counts beside fractions) are kept in different groups, since one
y axis cannot show both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

# Points per series a plot draws at most; longer series keep each bucket's minimum and maximum, so a spike
# in a 1000-step run (a grad-norm blow-up, an IS-weight outlier) stays visible.
MAX_POINTS = 400


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricGroup:
    """One plot: `keys` in legend order; `slug` identifies it in the page (data-group)."""

    slug: str
    title: str
    y_label: str
    keys: tuple[str, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class Series:
    """One curve: finite (step, value) points after downsampling; steps whose value was nan/inf kept apart."""

    key: str
    points: tuple[tuple[int, float], ...]
    non_finite_steps: tuple[int, ...]
    logged_points: int  # finite values before downsampling


# A rule: (slug pattern, title pattern, y label, matcher returning the regex match or None). Slugs and titles
# may use the match's `domain` group, which makes one group per domain.
Rule = tuple[str, str, str, Callable[[str], re.Match | None]]


def _pattern(expression: str) -> Callable[[str], re.Match | None]:
    return re.compile(expression).fullmatch


RULES: tuple[Rule, ...] = (
    ("teacher-kl-k1", "teacher KL (k1), overall and per domain", "nats / token",
     _pattern(r"teacher/(?:[^/]+/)?kl_k1")),
    ("teacher-kl-k3", "teacher KL (k3), overall and per domain", "nats / token",
     _pattern(r"teacher/(?:[^/]+/)?kl_k3")),
    ("implicit-reward-{domain}", "implicit reward lT - lR, domain {domain}", "nats / token",
     _pattern(r"reward/(?P<domain>[^/]+)/implicit_(?:mean|p1|p99|max)")),
    ("accuracy", "task reward (grader accuracy)", "fraction", _pattern(r"reward/(?:[^/]+/)?accuracy")),
    ("grading-failures", "grading failures", "rows", _pattern(r"reward/(?:[^/]+/)?grading_failures")),
    ("response-length", "response length", "tokens", _pattern(r"rollout/response_length(?:_max)?")),
    ("truncation", "truncation and teacher-given tokens", "fraction",
     _pattern(r"rollout/(?:truncated|teacher_token)_fraction")),
    ("entropy", "entropy", "nats / token", _pattern(r"student/entropy.*|[^/]+/teacher_entropy")),
    ("grad-norm", "gradient norm (before clipping)", "L2 norm", _pattern(r"optim/grad_norm")),
    ("learning-rate", "learning rate", "lr", _pattern(r"optim/lr")),
    ("skipped-steps", "skipped optimizer steps (non-finite)", "steps", _pattern(r"optim/skipped_steps")),
    ("is-weights", "importance-sampling weights", "ratio / fraction",
     _pattern(r"[^/]+/is_(?:weight_mean|weight_max|truncated_fraction)")),
    ("sampler-gap", "sampler vs trainer: max |lS - lOld| on sampled tokens", "nats",
     _pattern(r"rollout/sampler_gap_max")),
    ("staleness", "rollout staleness (async)", "weight versions", _pattern(r"async/staleness_(?:mean|max)")),
    ("engine-busy", "fraction of the step the engines were busy (async)", "fraction",
     _pattern(r"perf/engine_busy_fraction")),
    ("trust", "trust and outlier fractions (TrOPD)", "fraction",
     _pattern(r"teacher/untrusted_fraction|[^/]+/outlier_fraction|[^/]+/p_trust_mean")),
    ("guidance", "guidance prefix length", "tokens", _pattern(r"guidance/(?:max_prefix_length|prefix_tokens)")),
    ("eval", "evaluation results", "score", _pattern(r"eval/.+")),
    ("perf-seconds", "time per step", "seconds", _pattern(r"perf/.+_seconds")),
    ("perf-throughput", "throughput", "tokens / second", _pattern(r"perf/tokens_per_second")),
    ("token-counts", "tokens per step", "tokens", _pattern(r"[^/]+/tokens")),
)


def group_metrics(keys: list[str]) -> list[MetricGroup]:
    """Every key in exactly one group; groups in rule order (per-domain ones by domain), then the rest."""
    found: dict[str, tuple[int, str, str, list[str]]] = {}
    for key in keys:
        for order, (slug, title, y_label, matcher) in enumerate(RULES):
            if match := matcher(key):
                domain = match.groupdict().get("domain") or ""
                slug, title = slug.format(domain=domain), title.format(domain=domain)
                break
        else:
            order, prefix = len(RULES), key.split("/", 1)[0]
            title = f"{prefix} (other metrics)" if "/" in key else key  # `loss` alone is its own title
            slug, y_label = f"other-{prefix}", "value"
        found.setdefault(slug, (order, title, y_label, []))[3].append(key)
    ordered = sorted(found.items(), key=lambda item: (item[1][0], item[0]))
    return [MetricGroup(slug=_slug(slug), title=title, y_label=y_label, keys=tuple(sorted(group_keys)))
            for slug, (_, title, y_label, group_keys) in ordered]


def _slug(text: str) -> str:
    """A domain name may hold anything: the slug keeps only characters safe in an HTML attribute."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def build_series(records: list[dict], key: str, max_points: int = MAX_POINTS) -> Series:
    """The key's curve: null (absent that step) is a gap, "nan"/"inf" strings are counted apart."""
    points, non_finite = [], []
    for record in records:
        value = record.get(key)
        if value is None:
            continue
        number = float(value) if isinstance(value, (int, float, str)) else math.nan
        if math.isfinite(number):
            points.append((int(record["step"]), number))
        else:
            non_finite.append(int(record["step"]))
    return Series(key=key, points=tuple(downsample(points, max_points)), non_finite_steps=tuple(non_finite),
                  logged_points=len(points))


def downsample(points: list[tuple[int, float]], max_points: int) -> list[tuple[int, float]]:
    """At most `max_points` points: per bucket of consecutive steps its minimum and maximum, in step order."""
    if len(points) <= max_points:
        return points
    buckets = max(max_points // 2, 1)
    size = len(points) / buckets
    kept: list[tuple[int, float]] = []
    for index in range(buckets):
        bucket = points[int(index * size):int((index + 1) * size)]
        if not bucket:
            continue
        low, high = min(bucket, key=lambda point: point[1]), max(bucket, key=lambda point: point[1])
        kept.extend(sorted({low, high}))
    return kept
