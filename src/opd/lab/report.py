"""The lab's report: tables in the papers' layout, the verdict table (findings.py), plots (plots.py),
results.json."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from opd.lab.findings import (MINIMUM_GAP, PAPER_GAINS, Anchors, Findings, Results, all_greater, lam_sweep_runs,
                              measure_anchors, seed_mean, verdict_summary)
from opd.lab.plan import EXOPD_LAM, MISMATCH_VARIANTS, SHARPENING_TEMPERATURE, Scale
from opd.lab.plots import write_plots
from opd.lab.stats import Interval, interval, paired_difference, verdict_greater


def _cell(values: list[float] | dict[int, float], percent: bool = True) -> str:
    values = list(values.values()) if isinstance(values, dict) else values
    return interval(values).format(percent) if values else "—"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _run_mean(run: dict, key: str, reduce=lambda v: sum(v) / len(v)) -> float | None:
    values = [v for v in run.get("curves", {}).get(key, []) if v is not None]
    return reduce(values) if values else None


def _fewer_seeds(results: list[dict], seeds: int) -> str:
    """The runs (job names without their seed) with fewer than `seeds` seeds, grouped by their count."""
    counts: dict[str, set[int]] = {}
    for result in results:
        group, _, seed = result["name"].rpartition("/seed")
        if group and result["experiment"] != "models" and seed.isdigit():
            counts.setdefault(group, set()).add(int(seed))
    fewer: dict[int, list[str]] = {}
    for group, found in counts.items():
        if len(found) < seeds:
            fewer.setdefault(len(found), []).append(f"`{group}`")
    return "; ".join(f"{count}: {', '.join(groups)}" for count, groups in sorted(fewer.items(), reverse=True)) or "none"


def build_report(results: list[dict], scale: Scale) -> tuple[list[str], list[dict], dict]:
    """Markdown lines, the findings, and the numbers for results.json."""
    data = Results(results)
    anchors = measure_anchors(data)
    findings = Findings(anchors.gaps)
    sweep = lam_sweep_runs(data)
    lines = models_section(anchors) + sharpening_check(data, scale)
    numbers: dict = {"teacher_minus_base": anchors.gaps}
    for section in (lam_sweep_section(data, anchors, sweep, findings),
                    distillation_section(data, anchors, sweep, scale, findings),
                    strong_to_weak_section(data, anchors, findings),
                    mismatch_section(data, scale, findings)):
        if section:
            lines += section[0]
            numbers.update(section[1])
    lines += temperature_section(data, sweep, scale, findings)
    return lines, findings.rows, numbers


def models_section(anchors: Anchors) -> list[str]:
    teacher, base, gaps = anchors.teacher, anchors.base, anchors.gaps
    lines = ["## Models", "", "Accuracy (%) on the held-out problems, sampled at temperature 1; one model each, "
             "sampled with every seed's evaluation seed (the ± is its sampling error).", ""]
    lines += _table(["model", "sums", "programs"], [
        ["base (pretrained on demonstrations with systematic errors)", _cell(base["sums"]), _cell(base["programs"])],
        ["sums teacher (grpo from the base)", _cell(teacher["sums"]), "—"],
        ["programs teacher (grpo from the base)", "—", _cell(teacher["programs"])],
        ["large base", _cell(anchors.large_base), "—"],
        ["large sums teacher (grpo from the large base)", _cell(anchors.large_teacher), "—"],
    ])
    if gaps:
        lines += ["", "Teacher − base gap: " + ", ".join(f"{d} {g * 100:+.1f} points" for d, g in gaps.items())
                  + (f" (the comparisons need at least {MINIMUM_GAP * 100:.0f} on each)."
                     if all(g >= MINIMUM_GAP for g in gaps.values())
                     else f" — **below the {MINIMUM_GAP * 100:.0f} points the comparisons need**: the verdicts "
                          "that rest on such a teacher are inconclusive.")]
    return lines


def sharpening_check(data: Results, scale: Scale) -> list[str]:
    """Is a teacher's gain over its base more than sampling the base at a lower temperature? (ExOPD needs a
    teacher whose direction from its base is more than sharpening to extrapolate along.)"""
    parts = []
    for domain, base, teacher in (("sums", "base-sums", "sums-teacher"), ("programs", "base-programs", "programs-teacher"),
                                  ("large sums", "large-base-sums", "large-sums-teacher")):
        plain = {t: data.model(base, domain.split()[-1], t).get(0) for t in scale.control_temperatures}
        trained = data.model(teacher, domain.split()[-1]).get(0)
        if None in plain.values() or trained is None:
            continue
        best = max(scale.control_temperatures[1:], key=lambda t: plain[t])
        parts.append(f"{domain}: the base gains {(plain[best] - plain[1.0]) * 100:+.1f} points at its best lower "
                     f"temperature (T = {best:g}), its teacher {(trained - plain[1.0]) * 100:+.1f} at T = 1")
    if not parts:
        return []
    return ["", "Sharpening check (evaluation seed 0): " + "; ".join(parts) + ". A teacher's gain that lowering "
            "the base's temperature does not give is not temperature sharpening of the base."]


def lam_sweep_section(data: Results, anchors: Anchors, sweep: dict[float, list[dict]],
                      findings: Findings) -> tuple[list[str], dict] | None:
    """G-OPD Figures 2-4: accuracy, length and entropy against the reward scale λ."""
    if not any(sweep.values()):
        return None
    teacher, base = anchors.teacher, anchors.base
    lines = ["", "## G-OPD reward scale λ (sums, one teacher, reference = the base)", ""]
    rows = []
    for lam, runs in sweep.items():
        rows.append([f"{lam:g}" + (" (the base)" if lam == 0 else ""), _cell(data.values(runs, "sums")),
                     _cell(data.values(runs, "sums", field="length"), False),
                     _cell(data.values(runs, "sums", field="entropy"), False)])
    lines += _table(["λ", "accuracy (%)", "response tokens", "entropy (nats/token)"], rows)
    numbers = {"lam_sweep": {f"{lam:g}": data.values(runs, "sums") for lam, runs in sweep.items()}}
    acc = {lam: data.values(runs, "sums") for lam, runs in sweep.items()}
    paired = {lam: data.by_seed(runs, "sums") for lam, runs in sweep.items()}
    if acc.get(1.0) and teacher["sums"]:
        diff = paired_difference(paired[1.0], teacher["sums"])
        findings.equals("OPD (λ = 1) matches the teacher", "G-OPD Table 2 / Fig. 2", diff, "OPD − teacher on sums",
                        room=("sums",))
    if acc.get(0.5) and acc.get(1.0) and base["sums"]:
        low, high = paired_difference(paired[0.5], base["sums"]), paired_difference(paired[1.0], paired[0.5])
        findings.add("0 < λ < 1 interpolates between the base and the teacher", "G-OPD Fig. 2",
                     Interval(mean=min(low.mean, high.mean), low=min(low.low, high.low), high=min(low.high, high.high),
                              n=low.n), all_greater({verdict_greater(low), verdict_greater(high)}),
                     "the smaller of (λ=0.5 − base) and (λ=1 − λ=0.5)", room=("sums",))
    if acc.get(EXOPD_LAM) and teacher["sums"]:
        diff = paired_difference(paired[EXOPD_LAM], teacher["sums"])
        findings.beats("ExOPD (λ = 1.25) beats the teacher (sums)", "G-OPD Table 2", diff, "ExOPD − teacher",
                       gain="ExOPD − teacher (sums)", room=("sums",))
    if acc.get(EXOPD_LAM) and acc.get(1.0):
        diff = paired_difference(paired[EXOPD_LAM], paired[1.0])
        findings.beats("ExOPD beats OPD (sums)", "G-OPD Table 2", diff, "ExOPD − OPD",
                       gain="ExOPD − OPD (sums)", room=("sums",))
        lengths = paired_difference(data.by_seed(sweep[EXOPD_LAM], "sums", field="length"),
                                    data.by_seed(sweep[1.0], "sums", field="length"))
        findings.add("ExOPD's responses are longer than OPD's", "G-OPD §2.7 (length growth)", lengths,
                     verdict_greater(lengths), "ExOPD − OPD mean response length", room=("sums",), unit="tokens")
    if acc.get(1.5) and acc.get(EXOPD_LAM):
        diff = paired_difference(paired[EXOPD_LAM], paired[1.5])
        findings.add("λ = 1.5 degrades against λ = 1.25", "G-OPD Fig. 2-4", diff, verdict_greater(diff), "λ1.25 − λ1.5",
                     room=("sums",))
    return lines, numbers


def distillation_section(data: Results, anchors: Anchors, sweep: dict[float, list[dict]], scale: Scale,
                         findings: Findings) -> tuple[list[str], dict] | None:
    """G-OPD Table 2 layout: single- and multi-teacher SFT, ExPO, OPD and ExOPD on both domains."""
    if not data.runs("distillation"):
        return None
    teacher, base = anchors.teacher, anchors.base
    lines = ["", "## Single- and multi-teacher distillation (G-OPD Table 2 layout)", "",
             "Single-teacher OPD / ExOPD on sums are the λ sweep's λ = 1 and λ = 1.25 runs.", ""]
    rows = [["Teacher (domain teacher)", _cell(teacher["sums"]), _cell(teacher["programs"])],
            ["Student (init)", _cell(base["sums"]), _cell(base["programs"])]]
    table, seeded = {}, {}
    for setting in ("single", "multi"):
        for method in ("SFT", "ExPO", "OPD", "ExOPD"):
            runs = {d: _distillation_runs(data, sweep, setting, method, d) for d in ("sums", "programs")}
            table[(setting, method)] = {d: data.values(r, d) for d, r in runs.items()}
            seeded[(setting, method)] = {d: data.by_seed(r, d) for d, r in runs.items()}
            rows.append([f"{setting}-teacher {method}", _cell(table[(setting, method)]["sums"]),
                         _cell(table[(setting, method)]["programs"])])
    lines += _table(["method", "sums", "programs"], rows)
    lines += ["", "ExPO (α = {:g}) is a weight merge with no training randomness: one model per setting, sampled "
              "with every seed's evaluation seed (its ± is sampling error alone).".format(scale.expo_alpha)]
    numbers = {"distillation": {f"{s}/{m}": v for (s, m), v in table.items()}}
    values = table[("single", "ExOPD")]["programs"]
    if values and teacher["programs"]:
        diff = paired_difference(seeded[("single", "ExOPD")]["programs"], teacher["programs"])
        findings.beats("ExOPD (λ = 1.25) beats the teacher (programs)", "G-OPD Table 2", diff, "ExOPD − teacher",
                       gain="ExOPD − teacher (programs)", room=("programs",))
        diff = paired_difference(seeded[("single", "ExOPD")]["programs"], seeded[("single", "OPD")]["programs"])
        findings.beats("ExOPD beats OPD (programs)", "G-OPD Table 2", diff, "ExOPD − OPD",
                       gain="ExOPD − OPD (programs)", room=("programs",))
    _multi_teacher_findings(data, anchors, table, seeded, findings)
    return lines, numbers


def _distillation_runs(data: Results, sweep: dict[float, list[dict]], setting: str, method: str,
                       domain: str) -> list[dict]:
    if setting == "single" and domain == "sums" and method in ("OPD", "ExOPD"):
        return sweep.get(1.0 if method == "OPD" else EXOPD_LAM, [])
    return [r for r in data.runs("distillation", method=method, setting=setting)
            if r["labels"]["domain"] in (domain, "both")]


def _multi_teacher_findings(data: Results, anchors: Anchors, table: dict[tuple[str, str], dict[str, list[float]]],
                            seeded: dict[tuple[str, str], dict[str, dict[int, float]]], findings: Findings) -> None:
    teacher, multi = anchors.teacher, table[("multi", "ExOPD")]
    if not (all(multi.values()) and all(teacher.values())):
        return
    gains = {d: PAPER_GAINS[f"multi ExOPD − teacher ({d})"] for d in ("sums", "programs")}
    diffs = {d: paired_difference(seeded[("multi", "ExOPD")][d], teacher[d]) for d in ("sums", "programs")}
    weaker = min(diffs, key=lambda d: diffs[d].low)
    findings.add("Multi-teacher ExOPD beats both domain teachers", "G-OPD Table 2", diffs[weaker],
                 all_greater({verdict_greater(diffs[d], gains[d]) for d in diffs}),
                 f"the weaker domain's ExOPD − teacher ({weaker})", room=("sums", "programs"), paper_gain=gains[weaker])
    pooled = _both_domains(seeded[("multi", "ExOPD")])
    for other in ("OPD", "SFT", "ExPO"):
        if not all(table[("multi", other)].values()):
            continue
        # ExPO's merged model was sampled with each seed's evaluation seed: paired like a trained method.
        diff = paired_difference(pooled, _both_domains(seeded[("multi", other)]))
        findings.beats(f"Multi-teacher ExOPD beats multi-teacher {other}", "G-OPD Table 2", diff,
                       f"ExOPD − {other}, mean of both domains",
                       gain=f"multi ExOPD − {other}", room=("sums", "programs"))


def _both_domains(by_domain: dict[str, dict[int, float]]) -> dict[int, float]:
    """Per seed, the mean accuracy over sums and programs (seeds measured on both)."""
    sums, programs = by_domain["sums"], by_domain["programs"]
    return {seed: (sums[seed] + programs[seed]) / 2 for seed in sorted(set(sums) & set(programs))}


def strong_to_weak_section(data: Results, anchors: Anchors, findings: Findings) -> tuple[list[str], dict] | None:
    """G-OPD Table 3 / Fig. 6 layout: a large teacher distilled into the small base, with reward correction."""
    if not data.runs("strong_to_weak"):
        return None
    lines = ["", "## Strong-to-weak (G-OPD Table 3 / Fig. 6 layout; sums)", ""]
    methods = ("OPD", "ExOPD", "ExOPD + reward correction")
    values = {m: data.values(data.runs("strong_to_weak", method=m), "sums") for m in methods}
    paired = {m: data.by_seed(data.runs("strong_to_weak", method=m), "sums") for m in methods}
    lines += _table(["student (small base)", "large teacher", *methods],
                    [[_cell(anchors.base["sums"]), _cell(anchors.large_teacher),
                      *(_cell(values[m]) for m in methods)]])
    if values["ExOPD"] and values["OPD"]:
        diff = paired_difference(paired["ExOPD"], paired["OPD"])
        findings.beats("Strong-to-weak: ExOPD beats OPD", "G-OPD Table 3", diff, "ExOPD − OPD",
                       gain="strong-to-weak ExOPD − OPD", room=("large_sums",))
    if values["ExOPD + reward correction"] and values["ExOPD"]:
        diff = paired_difference(paired["ExOPD + reward correction"], paired["ExOPD"])
        findings.beats("Reward correction (reference = teacher's base) beats plain ExOPD", "G-OPD Fig. 6", diff,
                       "ExOPD+RC − ExOPD",
                       gain="reward correction − ExOPD", room=("large_sums",))
    return lines, {"strong_to_weak": values}


def mismatch_section(data: Results, scale: Scale, findings: Findings) -> tuple[list[str], dict] | None:
    """TrOPD under a strong distribution mismatch: accuracy, gradient norms, untrusted tokens."""
    if not data.runs("mismatch"):
        return None
    mismatched = data.model("mismatched-base-sums", "sums")
    lines = ["", "## Stability under mismatch (TrOPD; the sums teacher)", "",
             "The student was pretrained on the same demonstrations, half of them written with every symbol "
             "spaced (`7 + 5 = 1 2`), so many of its tokens are outliers under the teacher; answers are graded "
             f"blind to spacing. The student starts at {_cell(mismatched)}% "
             f"({scale.mismatch_steps} steps per run; untrusted = mean 1 − min(π_T/π_S, 1) over sampled tokens).", ""]
    rows, accuracy, grad, paired, paired_grad = [], {}, {}, {}, {}
    for variant in MISMATCH_VARIANTS:
        runs = data.runs("mismatch", method=variant)
        accuracy[variant], paired[variant] = data.values(runs, "sums"), data.by_seed(runs, "sums")
        paired_grad[variant] = {r["seed"]: g for r in runs if (g := _run_mean(r, "optim/grad_norm")) is not None}
        grad[variant] = list(paired_grad[variant].values())
        peaks = [g for g in (_run_mean(r, "optim/grad_norm", max) for r in runs) if g is not None]
        untrusted = [u for u in (_run_mean(r, "teacher/untrusted_fraction") for r in runs) if u is not None]
        rows.append([variant, _cell(accuracy[variant]), interval(grad[variant]).format(False) if grad[variant] else "—",
                     interval(peaks).format(False) if peaks else "—",
                     interval(untrusted).format() if untrusted else "—"])
    lines += _table(["objective", "accuracy (%)", "mean grad norm", "max grad norm", "untrusted tokens (%)"], rows)
    if accuracy.get("tropd-fkl") and accuracy.get("opd"):
        diff = paired_difference(paired["tropd-fkl"], paired["opd"])
        findings.beats("TrOPD (FKL outliers) beats OPD under mismatch", "TrOPD main table", diff, "TrOPD-FKL − OPD",
                       gain="TrOPD-FKL − OPD", room=("sums",))
    if accuracy.get("tropd-fkl+guidance") and accuracy.get("tropd-fkl"):
        diff = paired_difference(paired["tropd-fkl+guidance"], paired["tropd-fkl"])
        findings.beats("Teacher-prefix guidance helps TrOPD", "TrOPD ablation (d)", diff, "FKL+guidance − FKL",
                       gain="guidance", room=("sums",))
    if grad.get("opd") and grad.get("tropd-fkl"):
        diff = paired_difference(paired_grad["opd"], paired_grad["tropd-fkl"])
        findings.add("TrOPD trains with smaller gradients than OPD (stability)", "TrOPD §3", diff, verdict_greater(diff),
                     "OPD − TrOPD-FKL mean grad norm", unit="")
    return lines, {"mismatch": {"accuracy": accuracy, "grad_norm": grad}}


_CONTROL_MODELS = (("base", "base-sums", "sums"), ("base", "base-programs", "programs"),
                   ("sums teacher", "sums-teacher", "sums"), ("programs teacher", "programs-teacher", "programs"),
                   ("large base", "large-base-sums", "sums"), ("mismatched base", "mismatched-base-sums", "sums"),
                   ("large sums teacher", "large-sums-teacher", "sums"))


def temperature_section(data: Results, sweep: dict[float, list[dict]], scale: Scale, findings: Findings) -> list[str]:
    """The control no paper ran: is ExOPD's gain more than temperature sharpening?"""
    temperatures = scale.control_temperatures
    if not data.runs("temperature"):
        return []
    lines = ["", "## Control: sharpening by temperature alone (accuracy %, by sampling temperature)", "",
             "A cell without ± is one evaluation seed; the sums teacher, which the control's verdicts compare "
             "with, is sampled with every seed's.", ""]
    rows = []
    for label, name, domain in _CONTROL_MODELS:
        rows.append([f"{label} ({domain})", *(_cell(data.model(name, domain, t)) for t in temperatures)])
    opd_runs = data.runs("lam_sweep", lam=1.0)
    if opd_runs:
        rows.append([f"OPD student (sums; {len(opd_runs)} seeds at T = 1)",
                     *(_cell(data.values(opd_runs, "sums", t)) for t in temperatures)])
    lines += _table(["model", *(f"T = {t:g}" for t in temperatures)], rows)
    exopd = data.by_seed(sweep.get(EXOPD_LAM, []), "sums")
    lower = [data.model("sums-teacher", "sums", t) for t in temperatures[1:]]
    # The temperature at which the teacher is best on average: choosing it from the same samples favours
    # the teacher, so this finding can only err towards "not reproduced".
    sharpest = max((m for m in lower if m), key=seed_mean, default=None)
    if exopd and sharpest:
        diff = paired_difference(exopd, sharpest)
        findings.add("ExOPD's gain exceeds what sampling the teacher at a lower temperature gives", "control (ours)",
                     diff, verdict_greater(diff), "ExOPD@T1 − best teacher@T<1", room=("sums",))
    target = data.model("sums-teacher", "sums", SHARPENING_TEMPERATURE)
    if exopd and target:
        diff = paired_difference(exopd, target)
        findings.add(f"ExOPD's gain exceeds its uniform-reference target, the teacher at T = 1/λ = "
                     f"{SHARPENING_TEMPERATURE:g}", "control (ours)", diff, verdict_greater(diff),
                     f"ExOPD@T1 − teacher@T{SHARPENING_TEMPERATURE:g}", room=("sums",))
    return lines


def _versions() -> str:
    """The packages a run's numbers depend on: the lab is bit-reproducible on one machine and these versions."""
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "numpy"))


def write_report(root: Path, results: list[dict], scale: Scale, *, seconds: float, quick: bool) -> Path:
    lines, findings, numbers = build_report(results, scale)
    plots = write_plots(root, results)
    header = [
        "# opd lab results" + (" (--quick: checks the pipeline, not the findings)" if quick else ""), "",
        f"Command: `opd lab{' --quick' if quick else ''}` · {len(results)} jobs · "
        f"{sum(r.get('seconds', 0.0) for r in results) / 60:.1f} min of job time · "
        f"{seconds / 60:.1f} min wall in the last invocation (finished jobs are reused) · "
        f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}, "
        f"{_versions()}", "",
        f"Entries are `mean ± half-width of the 95% CI` over {scale.seeds} seeds, except the runs with fewer (where "
        f"fewer decide every comparison the run feeds, or it fills a table only), by count: "
        f"{_fewer_seeds(results, scale.seeds)}. A verdict's evidence names the seeds its pairs share; "
        f"each run is measured on {scale.test_problems} held-out problems × {scale.test_samples} samples per domain.",
        "", "Verdicts: every comparison is a paired per-seed difference (a t-interval over the seeds both sides "
        "ran). A seed fixes a run's prompt order, training draws and evaluation sampling seed; a single model (a "
        "teacher, a base, an ExPO merge) is sampled with every seed's evaluation seed, so its sampling error "
        "enters each difference.", "", "## Verdicts", "",
    ]
    header += _table(["published finding", "source", "verdict", "evidence"],
                     [[f["claim"], f["source"], f"**{f['verdict']}**", f["evidence"]] for f in findings])
    header += [""] + verdict_summary(findings)
    body = header + [""] + lines + ["", "## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    report = root / "results.md"
    report.write_text("\n".join(body))
    (root / "results.json").write_text(json.dumps({"findings": findings, "numbers": numbers, "seconds": seconds,
                                                   "quick": quick, "runs": results}, indent=1))
    return report
