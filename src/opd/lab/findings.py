"""The lab's verdicts: the papers' gains, the runs' numbers by seed, and a verdict per published finding.

A verdict is decided by a 95% confidence interval (stats.py): "reproduced" only when the interval is on
the finding's side, "not reproduced" when it is on the other side (for a "beats" finding with a number in
its paper: wholly below the paper's gain, PAPER_GAINS), "inconclusive" otherwise. Every interval
is a paired one over seeds: single models (teachers, bases, ExPO merges) are measured at each seed's
evaluation seed (plan.SINGLE_MODELS), so they pair with the trained students like a method. The report's
sections (report.py) compute the differences and add the rows here.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.lab.plan import TRAINED_LAMS
from opd.lab.stats import Interval, verdict_equal, verdict_greater

EQUAL_MARGIN = 0.05  # "matches the teacher": within 5 accuracy points
MINIMUM_GAP = 0.15  # a teacher must beat its base by this much for a comparison against it to mean anything
# The gain each paper reports for a comparison the lab repeats (accuracy points / 100; the papers' tables as
# digested in docs/lab.md "How verdicts are decided"). A "beats" finding is not reproduced when its interval
# excludes a gain this large; a finding the papers give no number for has none here (then only an interval
# wholly below 0 is "not reproduced").
PAPER_GAINS = {
    "ExOPD − teacher (sums)": 0.020,  # G-OPD Table 2, math average: 48.0 − 46.0
    "ExOPD − OPD (sums)": 0.015,  # 48.0 − 46.5
    "ExOPD − teacher (programs)": 0.009,  # code average: 62.1 − 61.2
    "ExOPD − OPD (programs)": 0.013,  # 62.1 − 60.8
    "multi ExOPD − teacher (sums)": 0.017,  # multi-teacher ExOPD 47.7 − math teacher 46.0
    "multi ExOPD − teacher (programs)": 0.008,  # 62.0 − code teacher 61.2
    "multi ExOPD − OPD": 0.0135,  # mean of math 47.7 − 46.4 and code 62.0 − 60.6
    "multi ExOPD − SFT": 0.023,  # mean of 47.7 − 44.3 and 62.0 − 60.8
    "multi ExOPD − ExPO": 0.0105,  # mean of 47.7 − 45.0 and 62.0 − 62.6
    "strong-to-weak ExOPD − OPD": 0.023,  # G-OPD Table 3, the smaller of its two students' gains (1.7B: 25.4 − 23.1)
    "reward correction − ExOPD": 0.006,  # G-OPD Fig. 6, math average: 28.7 − 28.1 (the smaller domain's)
    "TrOPD-FKL − OPD": 0.022,  # TrOPD Tables 1/5: FKL outlier 49.00 − OPD 46.79 (the lab's variant, no guidance)
    "guidance": 0.0085,  # TrOPD Table 5: TrOPD FKL (+ guidance) 49.85 − FKL outlier 49.00
}


class Results:
    def __init__(self, results: list[dict]):
        self.by_name = {r["name"]: r for r in results}
        self.all = results

    def runs(self, experiment: str, **labels) -> list[dict]:
        return [r for r in self.all if r["experiment"] == experiment
                and all(r["labels"].get(k) == v for k, v in labels.items())]

    def values(self, runs: list[dict], domain: str, temperature: float = 1.0, field: str = "accuracy") -> list[float]:
        key = f"{domain}@{temperature:g}"
        return [r["measurements"][key][field] for r in runs if key in r["measurements"]]

    def by_seed(self, runs: list[dict], domain: str, temperature: float = 1.0, field: str = "accuracy") -> dict[int, float]:
        """The runs' values keyed by seed: what paired comparisons match up."""
        key = f"{domain}@{temperature:g}"
        return {r["seed"]: r["measurements"][key][field] for r in runs if key in r["measurements"]}

    def model(self, name: str, domain: str, temperature: float = 1.0) -> dict[int, float]:
        """A single model's accuracy by evaluation seed (plan.SINGLE_MODELS: sampled with each seed's
        evaluation seed, so that a student is compared with it seed by seed)."""
        return self.by_seed(self.runs("temperature", model=name), domain, temperature)


def seed_mean(by_seed: dict[int, float]) -> float:
    return sum(by_seed.values()) / len(by_seed)


def lam_sweep_runs(data: Results) -> dict[float, list[dict]]:
    """The sweep's runs by λ; λ = 0 is the base itself (plan.TRAINED_LAMS says why), measured per seed."""
    sweep = {lam: data.runs("lam_sweep", lam=lam) for lam in TRAINED_LAMS}
    if not any(sweep.values()):
        return sweep
    return {0.0: data.runs("temperature", model="base-sums"), **sweep}


@dataclass(frozen=True)
class Anchors:
    """The single models every comparison is measured against: accuracy by evaluation seed (empty when not
    measured)."""

    teacher: dict[str, dict[int, float]]  # by domain: the grpo teacher
    base: dict[str, dict[int, float]]  # by domain: the pretrained base the students start from
    large_teacher: dict[int, float]
    large_base: dict[int, float]
    gaps: dict[str, float]  # mean teacher − mean base: "sums", "programs", "large_sums" where both are measured


def measure_anchors(data: Results) -> Anchors:
    teacher = {d: data.model(f"{d}-teacher", d) for d in ("sums", "programs")}
    base = {d: data.model(f"base-{d}", d) for d in ("sums", "programs")}
    large_teacher, large_base = data.model("large-sums-teacher", "sums"), data.model("large-base-sums", "sums")
    gaps = {d: seed_mean(teacher[d]) - seed_mean(base[d]) for d in teacher if teacher[d] and base[d]}
    if large_teacher and large_base:
        gaps["large_sums"] = seed_mean(large_teacher) - seed_mean(large_base)
    return Anchors(teacher=teacher, base=base, large_teacher=large_teacher, large_base=large_base, gaps=gaps)


class Findings:
    """The verdict rows, in the order the sections add them."""

    def __init__(self, gaps: dict[str, float]):
        self.gaps = gaps
        self.rows: list[dict] = []

    def add(self, claim: str, source: str, diff: Interval, verdict: str, what: str, *, room: tuple[str, ...] = (),
            unit: str = "points", paper_gain: float | None = None, margin: float | None = None) -> None:
        """One verdict row. `room`: the teachers ("sums", "programs", "large_sums") whose gain over their base the
        finding needs; a teacher that is not clearly better than its base leaves nothing to distil or to pass,
        so such a comparison is inconclusive whatever its interval says."""
        factor, digits = unit_format(unit)
        evidence = (f"{what}: {diff.mean * factor:+.{digits}f}{' ' + unit if unit else ''}, "
                    f"95% CI [{diff.low * factor:+.{digits}f}, {diff.high * factor:+.{digits}f}], {diff.n} seeds")
        if paper_gain is not None:
            evidence += f"; the paper's gain {paper_gain * factor:+.{digits}f}"
        short = [name for name in room if self.gaps.get(name, 0.0) < MINIMUM_GAP]
        if short:
            verdict = "inconclusive"
            evidence += (f" (teacher not {MINIMUM_GAP * 100:.0f} points above its base: {', '.join(short)}; "
                         "nothing to distil)")
        self.rows.append({"claim": claim, "source": source, "verdict": verdict, "evidence": evidence,
                          "difference": [diff.mean, diff.low, diff.high], "unit": unit, "paper_gain": paper_gain,
                          "margin": margin, "teachers_without_room": short})

    def beats(self, claim: str, source: str, diff: Interval, what: str, *, gain: str, room: tuple[str, ...]) -> None:
        """A "beats" row decided against the paper's own gain, PAPER_GAINS[gain] (stats.verdict_greater)."""
        paper_gain = PAPER_GAINS[gain]
        self.add(claim, source, diff, verdict_greater(diff, paper_gain), what, room=room, paper_gain=paper_gain)

    def equals(self, claim: str, source: str, diff: Interval, what: str, *, room: tuple[str, ...]) -> None:
        """A "matches" row: reproduced inside ±EQUAL_MARGIN, not reproduced wholly outside (stats.verdict_equal)."""
        self.add(claim, source, diff, verdict_equal(diff, EQUAL_MARGIN),
                 f"{what} (equal within ±{EQUAL_MARGIN * 100:.0f})", room=room, margin=EQUAL_MARGIN)


def unit_format(unit: str) -> tuple[float, int]:
    """How a difference in `unit` is printed: the factor from the stored fraction, and the decimals."""
    return {"points": (100.0, 1), "tokens": (1.0, 1)}.get(unit, (1.0, 3))


def all_greater(verdicts: set[str]) -> str:
    """The verdict of a finding that needs every one of several differences to be positive."""
    return ("reproduced" if verdicts == {"reproduced"} else
            "not reproduced" if "not reproduced" in verdicts else "inconclusive")


def verdict_summary(findings: list[dict]) -> list[str]:
    """The verdict table in words: how many findings each verdict has and which, the findings that came out
    "not reproduced" listed as prominently as the reproduced ones, and why each open one is open."""
    def why_open(row: dict) -> str:
        factor, digits = unit_format(row["unit"])
        bounds = f"[{row['difference'][1] * factor:+.{digits}f}, {row['difference'][2] * factor:+.{digits}f}]"
        if row["teachers_without_room"]:
            return "its teacher is too close to its base"
        if row["paper_gain"]:
            return f"its interval {bounds} holds both 0 and the paper's gain {row['paper_gain'] * factor:+.{digits}f}"
        if row["margin"]:  # verdict_equal: decided only inside the band or wholly outside it
            return f"its interval {bounds} crosses the ±{row['margin'] * factor:.0f}-point band"
        return f"its interval {bounds} holds 0"

    groups = {verdict: [row for row in findings if row["verdict"] == verdict]
              for verdict in ("reproduced", "not reproduced", "inconclusive")}
    lines = [f"**In short.** Of {len(findings)} findings, {len(groups['reproduced'])} are reproduced, "
             f"{len(groups['not reproduced'])} not reproduced and {len(groups['inconclusive'])} inconclusive.", ""]
    lines += [f"- Reproduced: {'; '.join(row['claim'] for row in groups['reproduced']) or 'none'}."]
    lines += [f"- Not reproduced: {'; '.join(row['claim'] for row in groups['not reproduced']) or 'none'}."]
    open_rows = "; ".join(f"{row['claim']} ({why_open(row)})" for row in groups["inconclusive"])
    lines += [f"- Inconclusive: {open_rows or 'none'}."]
    return lines
