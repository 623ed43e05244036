"""The lab's plots: accuracy against λ, and each experiment's training curves averaged over its seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

from opd.lab.findings import Results, lam_sweep_runs, seed_mean
from opd.lab.stats import interval


def _mean_curve(runs: list[dict], key: str) -> list[float]:
    curves = [[v for v in r.get("curves", {}).get(key, []) if v is not None] for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        return []
    length = min(len(c) for c in curves)
    return [sum(c[i] for c in curves) / len(curves) for i in range(length)]


def write_plots(root: Path, results: list[dict]) -> list[str]:
    # Only the plots need matplotlib, and its backend must be chosen before pyplot is imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, written = Results(results), []
    sweep = {lam: data.values(runs, "sums") for lam, runs in lam_sweep_runs(data).items()}
    if any(sweep.values()):
        figure, axis = plt.subplots(figsize=(5, 3.5))
        points = [(lam, interval(v)) for lam, v in sweep.items() if v]
        axis.errorbar([p[0] for p in points], [p[1].mean * 100 for p in points],
                      yerr=[[(p[1].mean - p[1].low) * 100 if math.isfinite(p[1].low) else 0 for p in points],
                            [(p[1].high - p[1].mean) * 100 if math.isfinite(p[1].high) else 0 for p in points]],
                      marker="o", capsize=3, label="G-OPD student")
        for name, style, label in (("sums-teacher", "--", "sums teacher"), ("base-sums", ":", "base")):
            value = data.model(name, "sums")
            if value:
                axis.axhline(seed_mean(value) * 100, linestyle=style, color="gray", label=label)
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
