"""The lab's report: tables in the papers' layout, a verdict per published finding, plots, results.json.

A verdict is decided by a 95% confidence interval (stats.py): "reproduced" only when the interval is on
the finding's side, "not reproduced" when it is on the other side, "inconclusive" otherwise.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

from opd.lab.plan import EXOPD_LAM, LAMS, MISMATCH_VARIANTS, Scale
from opd.lab.stats import Interval, difference, interval, verdict_equal, verdict_greater

EQUAL_MARGIN = 0.05  # "matches the teacher": within 5 accuracy points
MINIMUM_GAP = 0.15  # a teacher must beat its base by this much for a comparison against it to mean anything


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

    def single(self, name: str, domain: str, temperature: float = 1.0) -> tuple[float, int] | None:
        result = self.by_name.get(name)
        measurement = result and result["measurements"].get(f"{domain}@{temperature:g}")
        return (measurement["accuracy"], measurement["count"]) if measurement else None


def _cell(values: list[float], percent: bool = True) -> str:
    return interval(values).format(percent) if values else "—"


def _single_cell(value: tuple[float, int] | None) -> str:
    return f"{value[0] * 100:.1f}" if value else "—"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _mean_curve(runs: list[dict], key: str) -> list[float]:
    curves = [[v for v in r.get("curves", {}).get(key, []) if v is not None] for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        return []
    length = min(len(c) for c in curves)
    return [sum(c[i] for c in curves) / len(curves) for i in range(length)]


def _run_mean(run: dict, key: str, reduce=lambda v: sum(v) / len(v)) -> float | None:
    values = [v for v in run.get("curves", {}).get(key, []) if v is not None]
    return reduce(values) if values else None


def build_report(results: list[dict], scale: Scale) -> tuple[list[str], list[dict], dict]:
    """Markdown lines, the findings, and the numbers for results.json."""
    data = Results(results)
    lines: list[str] = []
    findings: list[dict] = []
    numbers: dict = {}

    def finding(claim: str, source: str, diff: Interval, verdict: str, what: str, *, room: tuple[str, ...] = (),
                unit: str = "points") -> None:
        """One verdict row. `room`: the teachers ("sums", "programs", "large_sums") whose gain over their base the
        finding needs; a teacher that is not clearly better than its base leaves nothing to distil or to pass,
        so such a comparison is inconclusive whatever its interval says."""
        scale, digits = {"points": (100.0, 1), "tokens": (1.0, 1)}.get(unit, (1.0, 3))
        evidence = (f"{what}: {diff.mean * scale:+.{digits}f}{' ' + unit if unit else ''}, "
                    f"95% CI [{diff.low * scale:+.{digits}f}, {diff.high * scale:+.{digits}f}]")
        short = [name for name in room if gaps.get(name, 0.0) < MINIMUM_GAP]
        if short:
            verdict = "inconclusive"
            evidence += (f" (teacher not {MINIMUM_GAP * 100:.0f} points above its base: {', '.join(short)}; "
                         "nothing to distil)")
        findings.append({"claim": claim, "source": source, "verdict": verdict, "evidence": evidence,
                         "difference": [diff.mean, diff.low, diff.high], "unit": unit})

    teacher = {d: data.single(f"teachers/{d}", d) for d in ("sums", "programs")}
    base = {d: data.single(f"temperature/base-{d}", d) for d in ("sums", "programs")}
    large_teacher, large_base = data.single("teachers/large_sums", "sums"), data.single("temperature/large-base-sums", "sums")

    lines += ["## Models", "", "Accuracy (%) on the held-out problems, sampled at temperature 1.", ""]
    lines += _table(["model", "sums", "programs"], [
        ["base (pretrained on demonstrations with systematic errors)", _single_cell(base["sums"]), _single_cell(base["programs"])],
        ["sums teacher (grpo from the base)", _single_cell(teacher["sums"]), "—"],
        ["programs teacher (grpo from the base)", "—", _single_cell(teacher["programs"])],
        ["large base", _single_cell(large_base), "—"],
        ["large sums teacher (grpo from the large base)", _single_cell(large_teacher), "—"],
    ])
    gaps = {d: (teacher[d][0] - base[d][0]) for d in teacher if teacher[d] and base[d]}
    if large_teacher and large_base:
        gaps["large_sums"] = large_teacher[0] - large_base[0]
    numbers["teacher_minus_base"] = gaps
    if gaps:
        lines += ["", "Teacher − base gap: " + ", ".join(f"{d} {g * 100:+.1f} points" for d, g in gaps.items())
                  + (f" (the comparisons need at least {MINIMUM_GAP * 100:.0f} on each)."
                     if all(g >= MINIMUM_GAP for g in gaps.values())
                     else f" — **below the {MINIMUM_GAP * 100:.0f} points the comparisons need**: the verdicts "
                          "that rest on such a teacher are inconclusive.")]

    # λ sweep (G-OPD Figures 2-4)
    sweep = {lam: data.runs("lam_sweep", lam=lam) for lam in LAMS}
    if any(sweep.values()):
        lines += ["", "## G-OPD reward scale λ (sums, one teacher, reference = the base)", ""]
        rows = []
        for lam, runs in sweep.items():
            rows.append([f"{lam:g}", _cell(data.values(runs, "sums")),
                         _cell(data.values(runs, "sums", field="length"), False),
                         _cell(data.values(runs, "sums", field="entropy"), False)])
        lines += _table(["λ", "accuracy (%)", "response tokens", "entropy (nats/token)"], rows)
        numbers["lam_sweep"] = {f"{lam:g}": data.values(runs, "sums") for lam, runs in sweep.items()}
        acc = {lam: data.values(runs, "sums") for lam, runs in sweep.items()}
        if acc.get(1.0) and teacher["sums"]:
            diff = difference(acc[1.0], *teacher["sums"])
            finding("OPD (λ = 1) matches the teacher", "G-OPD Table 2 / Fig. 2", diff,
                    verdict_equal(diff, EQUAL_MARGIN), f"OPD − teacher on sums (equal within ±{EQUAL_MARGIN * 100:.0f})",
                    room=("sums",))
        if acc.get(0.5) and acc.get(1.0) and base["sums"]:
            low, high = difference(acc[0.5], *base["sums"]), difference(acc[1.0], acc[0.5])
            verdicts = {verdict_greater(low), verdict_greater(high)}
            verdict = ("reproduced" if verdicts == {"reproduced"} else
                       "not reproduced" if "not reproduced" in verdicts else "inconclusive")
            finding("0 < λ < 1 interpolates between the base and the teacher", "G-OPD Fig. 2",
                    Interval(mean=min(low.mean, high.mean), low=min(low.low, high.low), high=min(low.high, high.high),
                             n=low.n), verdict, "the smaller of (λ=0.5 − base) and (λ=1 − λ=0.5)", room=("sums",))
        if acc.get(EXOPD_LAM) and teacher["sums"]:
            diff = difference(acc[EXOPD_LAM], *teacher["sums"])
            finding("ExOPD (λ = 1.25) beats the teacher (sums)", "G-OPD Table 2", diff, verdict_greater(diff),
                    "ExOPD − teacher", room=("sums",))
        if acc.get(EXOPD_LAM) and acc.get(1.0):
            diff = difference(acc[EXOPD_LAM], acc[1.0])
            finding("ExOPD beats OPD (sums)", "G-OPD Table 2", diff, verdict_greater(diff), "ExOPD − OPD",
                    room=("sums",))
            lengths = difference(data.values(sweep[EXOPD_LAM], "sums", field="length"),
                                 data.values(sweep[1.0], "sums", field="length"))
            finding("ExOPD's responses are longer than OPD's", "G-OPD §2.7 (length growth)", lengths,
                    verdict_greater(lengths), "ExOPD − OPD mean response length", room=("sums",), unit="tokens")
        if acc.get(1.5) and acc.get(EXOPD_LAM):
            diff = difference(acc[EXOPD_LAM], acc[1.5])
            finding("λ = 1.5 degrades against λ = 1.25", "G-OPD Fig. 2-4", diff, verdict_greater(diff), "λ1.25 − λ1.5",
                    room=("sums",))

    # Table 2 layout: single- and multi-teacher distillation
    if data.runs("distillation"):
        lines += ["", "## Single- and multi-teacher distillation (G-OPD Table 2 layout)", "",
                  "Single-teacher OPD / ExOPD on sums are the λ sweep's λ = 1 and λ = 1.25 runs.", ""]

        def column(setting: str, method: str, domain: str) -> list[float]:
            if setting == "single" and domain == "sums" and method in ("OPD", "ExOPD"):
                return data.values(sweep.get(1.0 if method == "OPD" else EXOPD_LAM, []), "sums")
            runs = [r for r in data.runs("distillation", method=method, setting=setting)
                    if r["labels"]["domain"] in (domain, "both")]
            return data.values(runs, domain)

        rows = [["Teacher (domain teacher)", _single_cell(teacher["sums"]), _single_cell(teacher["programs"])],
                ["Student (init)", _single_cell(base["sums"]), _single_cell(base["programs"])]]
        table = {}
        for setting in ("single", "multi"):
            for method in ("SFT", "ExPO", "OPD", "ExOPD"):
                table[(setting, method)] = {d: column(setting, method, d) for d in ("sums", "programs")}
                rows.append([f"{setting}-teacher {method}", _cell(table[(setting, method)]["sums"]),
                             _cell(table[(setting, method)]["programs"])])
        lines += _table(["method", "sums", "programs"], rows)
        lines += ["", "ExPO (α = {:g}) is a weight merge with no training randomness: one model per setting, "
                  "compared through its binomial sampling error.".format(scale.expo_alpha)]
        numbers["distillation"] = {f"{s}/{m}": v for (s, m), v in table.items()}
        for domain in ("sums", "programs"):
            values = table[("single", "ExOPD")][domain]
            if values and teacher[domain] and domain == "programs":
                diff = difference(values, *teacher[domain])
                finding("ExOPD (λ = 1.25) beats the teacher (programs)", "G-OPD Table 2", diff,
                        verdict_greater(diff), "ExOPD − teacher", room=("programs",))
                diff = difference(values, table[("single", "OPD")][domain])
                finding("ExOPD beats OPD (programs)", "G-OPD Table 2", diff, verdict_greater(diff), "ExOPD − OPD",
                        room=("programs",))
        multi = table[("multi", "ExOPD")]
        if all(multi.values()) and all(teacher.values()):
            diffs = [difference(multi[d], *teacher[d]) for d in ("sums", "programs")]
            worst = min(diffs, key=lambda d: d.low)
            verdicts = {verdict_greater(d) for d in diffs}
            verdict = ("reproduced" if verdicts == {"reproduced"} else
                       "not reproduced" if "not reproduced" in verdicts else "inconclusive")
            finding("Multi-teacher ExOPD beats both domain teachers", "G-OPD Table 2", worst, verdict,
                    "the weaker domain's ExOPD − teacher", room=("sums", "programs"))
            pooled = [sum(p) / 2 for p in zip(multi["sums"], multi["programs"])]
            for other in ("OPD", "SFT", "ExPO"):
                if not all(table[("multi", other)].values()):
                    continue
                rival = [sum(p) / 2 for p in zip(table[("multi", other)]["sums"], table[("multi", other)]["programs"])]
                if other == "ExPO":  # one merged model: its error is binomial over both domains' graded samples
                    counts = [data.single("distillation/expo-multi", d) for d in ("sums", "programs")]
                    diff = difference(pooled, rival[0], sum(c[1] for c in counts))
                else:
                    diff = difference(pooled, rival)
                finding(f"Multi-teacher ExOPD beats multi-teacher {other}", "G-OPD Table 2", diff,
                        verdict_greater(diff), f"ExOPD − {other}, mean of both domains", room=("sums", "programs"))

    # Table 3 layout: strong-to-weak and reward correction
    if data.runs("strong_to_weak"):
        lines += ["", "## Strong-to-weak (G-OPD Table 3 / Fig. 6 layout; sums)", ""]
        methods = ("OPD", "ExOPD", "ExOPD + reward correction")
        values = {m: data.values(data.runs("strong_to_weak", method=m), "sums") for m in methods}
        lines += _table(["student (small base)", "large teacher", *methods],
                        [[_single_cell(base["sums"]), _single_cell(large_teacher), *(_cell(values[m]) for m in methods)]])
        numbers["strong_to_weak"] = values
        if values["ExOPD"] and values["OPD"]:
            diff = difference(values["ExOPD"], values["OPD"])
            finding("Strong-to-weak: ExOPD beats OPD", "G-OPD Table 3", diff, verdict_greater(diff), "ExOPD − OPD",
                    room=("large_sums",))
        if values["ExOPD + reward correction"] and values["ExOPD"]:
            diff = difference(values["ExOPD + reward correction"], values["ExOPD"])
            finding("Reward correction (reference = teacher's base) beats plain ExOPD", "G-OPD Fig. 6", diff,
                    verdict_greater(diff), "ExOPD+RC − ExOPD", room=("large_sums",))

    # TrOPD under a strong distribution mismatch
    if data.runs("mismatch"):
        mismatched = data.single("temperature/mismatched-base-sums", "sums")
        lines += ["", "## Stability under mismatch (TrOPD; the sums teacher)", "",
                  "The student was pretrained on the same demonstrations, half of them written with every symbol "
                  "spaced (`7 + 5 = 1 2`), so many of its tokens are outliers under the teacher; answers are graded "
                  f"blind to spacing. The student starts at {_single_cell(mismatched)}% "
                  f"({scale.mismatch_steps} steps per run; untrusted = mean 1 − min(π_T/π_S, 1) over sampled tokens).", ""]
        rows, accuracy, grad = [], {}, {}
        for variant in MISMATCH_VARIANTS:
            runs = data.runs("mismatch", method=variant)
            accuracy[variant] = data.values(runs, "sums")
            grad[variant] = [g for g in (_run_mean(r, "optim/grad_norm") for r in runs) if g is not None]
            peaks = [g for g in (_run_mean(r, "optim/grad_norm", max) for r in runs) if g is not None]
            untrusted = [u for u in (_run_mean(r, "teacher/untrusted_fraction") for r in runs) if u is not None]
            rows.append([variant, _cell(accuracy[variant]), interval(grad[variant]).format(False) if grad[variant] else "—",
                         interval(peaks).format(False) if peaks else "—",
                         interval(untrusted).format() if untrusted else "—"])
        lines += _table(["objective", "accuracy (%)", "mean grad norm", "max grad norm", "untrusted tokens (%)"], rows)
        numbers["mismatch"] = {"accuracy": accuracy, "grad_norm": grad}
        if accuracy.get("tropd-fkl") and accuracy.get("opd"):
            diff = difference(accuracy["tropd-fkl"], accuracy["opd"])
            finding("TrOPD (FKL outliers) beats OPD under mismatch", "TrOPD main table", diff, verdict_greater(diff),
                    "TrOPD-FKL − OPD", room=("sums",))
        if accuracy.get("tropd-fkl+guidance") and accuracy.get("tropd-fkl"):
            diff = difference(accuracy["tropd-fkl+guidance"], accuracy["tropd-fkl"])
            finding("Teacher-prefix guidance helps TrOPD", "TrOPD ablation (d)", diff, verdict_greater(diff),
                    "FKL+guidance − FKL", room=("sums",))
        if grad.get("opd") and grad.get("tropd-fkl"):
            diff = difference(grad["opd"], grad["tropd-fkl"])
            finding("TrOPD trains with smaller gradients than OPD (stability)", "TrOPD §3", diff, verdict_greater(diff),
                    "OPD − TrOPD-FKL mean grad norm", unit="")

    # The control no paper ran: is ExOPD's gain more than temperature sharpening?
    temperatures = scale.control_temperatures
    if data.runs("temperature") or data.runs("models"):
        lines += ["", "## Control: sharpening by temperature alone (accuracy %, by sampling temperature)", ""]
        rows = []
        for label, name, domain in (("base", "temperature/base-sums", "sums"), ("base", "temperature/base-programs", "programs"),
                                    ("sums teacher", "teachers/sums", "sums"), ("programs teacher", "teachers/programs", "programs"),
                                    ("large base", "temperature/large-base-sums", "sums"),
                                    ("mismatched base", "temperature/mismatched-base-sums", "sums"),
                                    ("large sums teacher", "teachers/large_sums", "sums")):
            rows.append([f"{label} ({domain})", *(_single_cell(data.single(name, domain, t)) for t in temperatures)])
        opd_runs = data.runs("lam_sweep", lam=1.0)
        if opd_runs:
            rows.append([f"OPD student (sums; {len(opd_runs)} seeds)",
                         *(_cell(data.values(opd_runs, "sums", t)) for t in temperatures)])
        lines += _table(["model", *(f"T = {t:g}" for t in temperatures)], rows)
        sharpest = max((data.single("teachers/sums", "sums", t) or (0.0, 0) for t in temperatures[1:]), default=None)
        exopd = data.values(sweep.get(EXOPD_LAM, []), "sums") if data.runs("lam_sweep") else []
        if exopd and sharpest and sharpest[1]:
            diff = difference(exopd, *sharpest)
            finding("ExOPD's gain exceeds what sampling the teacher at a lower temperature gives", "control (ours)",
                    diff, verdict_greater(diff), "ExOPD@T1 − best teacher@T<1", room=("sums",))
    return lines, findings, numbers


def write_plots(root: Path, results: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, written = Results(results), []
    sweep = {lam: data.values(data.runs("lam_sweep", lam=lam), "sums") for lam in LAMS}
    if any(sweep.values()):
        figure, axis = plt.subplots(figsize=(5, 3.5))
        points = [(lam, interval(v)) for lam, v in sweep.items() if v]
        axis.errorbar([p[0] for p in points], [p[1].mean * 100 for p in points],
                      yerr=[[(p[1].mean - p[1].low) * 100 if math.isfinite(p[1].low) else 0 for p in points],
                            [(p[1].high - p[1].mean) * 100 if math.isfinite(p[1].high) else 0 for p in points]],
                      marker="o", capsize=3, label="G-OPD student")
        for name, style, label in (("teachers/sums", "--", "sums teacher"), ("temperature/base-sums", ":", "base")):
            value = data.single(name, "sums")
            if value:
                axis.axhline(value[0] * 100, linestyle=style, color="gray", label=label)
        axis.set_xlabel("λ (reward scale)")
        axis.set_ylabel("sums accuracy (%), T = 1")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(root / "accuracy_vs_lam.png", dpi=110)
        plt.close(figure)
        written.append("accuracy_vs_lam.png")
    panels = {"lam_sweep": ("rollout/response_length", "student/entropy"),
              "distillation": ("rollout/response_length", "student/entropy"),
              "strong_to_weak": ("rollout/response_length", "student/entropy"),
              "mismatch": ("rollout/response_length", "student/entropy", "optim/grad_norm", "teacher/untrusted_fraction")}
    for experiment, keys in panels.items():
        runs = data.runs(experiment)
        if not any(r.get("curves") for r in runs):
            continue
        methods = sorted({json.dumps({k: v for k, v in r["labels"].items() if k != "seed"}, sort_keys=True)
                          for r in runs if r.get("curves")})
        figure, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
        for axis, key in zip(axes, keys):
            for method in methods:
                labels = json.loads(method)
                shown = key
                if key == "student/entropy" and labels.get("method") == "SFT":
                    # SFT trains on teacher-written responses: the student's entropy on those tokens
                    shown = "student/entropy_given_tokens"
                curve = _mean_curve([r for r in runs if {k: v for k, v in r["labels"].items() if k != "seed"} == labels], shown)
                if curve:
                    name = labels.get("method", "?") + (f" ({labels['setting']}, {labels['domain']})" if "setting" in labels else "")
                    axis.plot(range(1, len(curve) + 1), curve, label=name, linewidth=1)
            sft = key == "student/entropy" and any(json.loads(m).get("method") == "SFT" for m in methods)
            axis.set_title(key + ("\n(SFT: on its teacher's tokens)" if sft else ""), fontsize=9)
            axis.set_xlabel("step")
        axes[0].legend(fontsize=6)
        figure.tight_layout()
        figure.savefig(root / f"curves_{experiment}.png", dpi=110)
        plt.close(figure)
        written.append(f"curves_{experiment}.png")
    return written


def write_report(root: Path, results: list[dict], scale: Scale, *, seconds: float, quick: bool) -> Path:
    lines, findings, numbers = build_report(results, scale)
    plots = write_plots(root, results)
    header = [
        "# opd lab results" + (" (--quick: checks the pipeline, not the findings)" if quick else ""), "",
        f"Command: `opd lab{' --quick' if quick else ''}` · {len(results)} jobs · "
        f"{sum(r.get('seconds', 0.0) for r in results) / 60:.1f} min of job time · "
        f"{seconds / 60:.1f} min wall in the last invocation (finished jobs are reused) · "
        f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores, {platform.python_version()}", "",
        f"Entries are `mean ± half-width of the 95% CI` over {scale.seeds} seeds unless a row says otherwise; "
        f"each run is measured on {scale.test_problems} held-out problems × {scale.test_samples} samples per domain.",
        "", "## Verdicts", "",
    ]
    header += _table(["published finding", "source", "verdict", "evidence"],
                     [[f["claim"], f["source"], f"**{f['verdict']}**", f["evidence"]] for f in findings])
    body = header + [""] + lines + ["", "## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    report = root / "results.md"
    report.write_text("\n".join(body))
    (root / "results.json").write_text(json.dumps({"findings": findings, "numbers": numbers, "seconds": seconds,
                                                   "quick": quick, "runs": results}, indent=1))
    return report
