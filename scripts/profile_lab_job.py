"""Profile one full-size lab job alone, with the jobs it needs: where its seconds go (docs/lab.md, Runtime).

    .venv/bin/python scripts/profile_lab_job.py [--job lam_sweep/lam1.0/seed0] [--output runs/lab-profile]

Runs, on one single-threaded process as a lab worker does, the base's pretraining, the sums teacher's grpo
and the chosen experiment job (finished ones are reused), each under cProfile, and prints per phase the
seconds spent (the cumulative time of the function that does the phase) and their share of the job.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
from pathlib import Path

# (label, file suffix, function name): the phases of a job, as the functions that carry them out.
PHASES = (
    ("pretraining loop", "lab/pretrain.py", "pretrain"),
    ("  of which backward", "", "run_backward"),
    ("student sampling (rollouts)", "opd/collect.py", "collect"),
    ("grading (reward)", "opd/collect.py", "grade"),
    ("teacher + reference scoring", "opd/teachers.py", "score_batch"),
    ("forward + backward + optimizer", "opd/train.py", "train_step"),
    ("held-out evaluation", "lab/measure.py", "measure"),
    ("  of which grading", "lab/measure.py", "_grade"),
)


def phase_seconds(stats: pstats.Stats, suffix: str, name: str) -> float:
    return max((row[3] for (file, _, function), row in stats.stats.items()
                if function == name and file.endswith(suffix)), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="lam_sweep/lam1.0/seed0", help="an experiment job's name (plan.py)")
    parser.add_argument("--output", default="runs/lab-profile")
    arguments = parser.parse_args()

    import torch

    from opd.lab.pipeline import RESULT, execute, write_data
    from opd.lab.plan import FULL, experiment_jobs, model_jobs, teacher_jobs
    from opd.runtime.models import quiet_transformers

    torch.set_num_threads(1)  # as a lab worker
    quiet_transformers()
    root = Path(arguments.output).resolve()
    write_data(root, FULL)
    wanted = [job for job in experiment_jobs(FULL) if job.name == arguments.job]
    if not wanted:
        raise SystemExit(f"opd: no lab job named {arguments.job!r} (see opd.lab.plan.experiment_jobs)")
    for job in (model_jobs(FULL)[0], teacher_jobs(FULL)[0], wanted[0]):
        if (root / job.name / RESULT).exists():
            print(f"{job.name}: reused from {root}")
            continue
        profiler = cProfile.Profile()
        profiler.runcall(execute, job, root, FULL)
        stats = pstats.Stats(profiler)
        total = max(row[3] for row in stats.stats.values())
        print(f"{job.name}: {total:.1f} s")
        for label, suffix, name in PHASES:
            seconds = phase_seconds(stats, suffix, name)
            if seconds > 0:
                print(f"  {label:32s} {seconds:7.1f} s  {100 * seconds / total:5.1f}%")


if __name__ == "__main__":  # the graders' worker processes are spawned: they re-import this file
    main()
