"""Running the lab: its jobs on a pool of single-threaded worker processes, each job as soon as the jobs that
make its models have finished.

    data + tokenizer -> pretrain (base, large base, mismatched base) -> grpo teachers -> ExPO merges
    -> experiments (and every single model measured at each seed's evaluation seed) -> report

The arrows are dependencies, not barriers: a stage only groups jobs in the progress display.

Two single-threaded processes side by side beat one process with two threads on this kind of machine
(research/lab-feasibility.md), so each worker pins torch to one thread and the pool has one worker per
core. A job writes `result.json` last: a finished job is reused when the lab runs again, so an
interrupted lab resumes where it stopped and `--only` can add experiments to an existing folder.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

from opd.lab.plan import (EXPERIMENTS, FULL, QUICK, Job, Scale, dependencies, experiment_jobs, merge_jobs, model_jobs,
                          teacher_jobs)
from opd.lab.tasks import DOMAINS, problems

RESULT = "result.json"
GRADES = "grades.sqlite"  # every held-out answer's grade, shared by the workers (lab/measure.py)


# The parent process only schedules jobs and never imports torch or the training stack; each job imports
# them in its worker (below, and in `execute`), so the imports there stay inside the functions.


def _initialize_worker() -> None:
    import torch

    torch.set_num_threads(1)
    from opd.runtime.models import quiet_transformers

    quiet_transformers()


def _absolute(root: Path, config: dict) -> dict:
    """A job's opd config with the lab-relative model and data paths made absolute."""
    config = json.loads(json.dumps(config))
    config["student"]["path"] = str(root / config["student"]["path"])
    config["data"]["path"] = str(root / config["data"]["path"])
    for teacher in config["teachers"]:
        for key in ("path", "reference"):
            if teacher.get(key) not in (None, "student_init"):
                teacher[key] = str(root / teacher[key])
    return config


def _curves(run_dir: Path) -> dict[str, list[float]]:
    from opd.runtime.monitor import read_metrics

    keys = ("rollout/response_length", "student/entropy", "student/entropy_given_tokens", "optim/grad_norm",
            "teacher/untrusted_fraction", "teacher/kl_k1", "reward/accuracy")
    records = read_metrics(run_dir / "metrics.jsonl")
    return {key: [record.get(key) for record in records] for key in keys if any(key in r for r in records)}


def execute(job: Job, root: Path, scale: Scale) -> dict:
    """Run one job in this process; returns (and saves) its result."""
    from opd.config import load_config
    from opd.lab.pretrain import pretrain
    from opd.merge import expo_merge
    from opd.train import train

    folder = root / job.name
    started = time.perf_counter()
    result: dict = {"name": job.name, "experiment": job.experiment, "labels": job.labels, "seed": job.seed}
    if job.kind == "pretrain":
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished job starts over
        losses = pretrain(folder / "final", root / "tokenizer", job.pretrain["shape"], job.pretrain["settings"],
                          job.pretrain["style"], job.seed)
        result["loss"] = {"first": losses[0], "last": sum(losses[-10:]) / len(losses[-10:])}
        model = folder / "final"
    elif job.kind == "train":
        if folder.exists():
            shutil.rmtree(folder)
        config = _absolute(root, job.config)
        config["train"]["output_dir"] = str(folder)
        model = train(load_config(base=config))
        result["curves"] = _curves(folder)
    elif job.kind == "merge":
        model = folder / "final"
        expo_merge([str(root / t) for t in job.merge["teachers"]], str(root / job.merge["student"]),
                   job.merge["alpha"], str(model))
    else:
        model = root / job.model
    result["measurements"] = _measure_model(job, root, scale, model)
    result["seconds"] = time.perf_counter() - started
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESULT).write_text(json.dumps(result, indent=1))
    return result


def _measure_model(job: Job, root: Path, scale: Scale, model: Path) -> dict[str, dict]:
    """The job's held-out measurements, by "domain@temperature"; grades shared through the lab's store."""
    from opd.lab.measure import GradeStore, measure

    measurements: dict[str, dict] = {}
    if not job.measure_domains:
        return measurements
    with GradeStore(root / GRADES) as store:
        for domain in job.measure_domains:
            test = problems(domain, scale.test_problems, seed=0, test=True)
            for temperature in job.temperatures:
                # The sampling seed is the run's seed: seeds of deterministic jobs (ExPO) differ only in sampling.
                m = measure(str(model), test, temperature=temperature, samples=scale.test_samples,
                            seed=1000 + job.seed, store=store)
                measurements[f"{domain}@{temperature:g}"] = dataclasses.asdict(m)
    return measurements


def _execute_in_worker(arguments) -> dict:
    job = arguments[0]
    try:
        return execute(*arguments)
    except Exception as error:  # name the job: a worker's traceback alone does not say which run failed
        raise RuntimeError(f"lab job '{job.name}' failed: {type(error).__name__}: {error}") from error


def write_data(root: Path, scale: Scale) -> None:
    """Training prompts per domain (and both mixed), the held-out test split never among them."""
    from opd.lab.pretrain import build_lab_tokenizer

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = {}
    for domain in DOMAINS:
        rows[domain] = [json.dumps({"prompt": p.prompt, "domain": domain, "answer": p.answer, "tests": p.tests or None})
                        for p in problems(domain, scale.train_problems, seed=0, test=False)]
        (data / f"{domain}.jsonl").write_text("\n".join(rows[domain]) + "\n")
    mixed = [row for pair in zip(*rows.values()) for row in pair]
    (data / "mixed.jsonl").write_text("\n".join(mixed) + "\n")
    if not (root / "tokenizer" / "tokenizer.json").exists():
        build_lab_tokenizer(root / "tokenizer")


def run_lab(output_dir: str, *, quick: bool = False, seeds: int | None = None, only: tuple[str, ...] = EXPERIMENTS,
            workers: int | None = None, progress: bool = True) -> Path:
    """Run (or resume) the lab in `output_dir`; returns the path of results.md."""
    from opd.lab.report import write_report

    unknown = sorted(set(only) - set(EXPERIMENTS))
    if unknown:
        raise ValueError(f"--only: unknown experiment(s) {unknown}; valid: {list(EXPERIMENTS)}")
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    scale = QUICK if quick else FULL
    if seeds is not None:  # one scale for the jobs and for the report, whose header names the seeds
        scale = dataclasses.replace(scale, seeds=seeds)
    root = Path(output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "lab.json"
    identity = {"scale": "quick" if quick else "full"}
    if marker.exists() and json.loads(marker.read_text()).get("scale") != identity["scale"]:
        raise ValueError(f"{root} holds a {json.loads(marker.read_text())['scale']} lab; use another --output "
                         f"for a {identity['scale']} one (nothing was changed)")
    marker.write_text(json.dumps(identity))
    started = time.perf_counter()
    write_data(root, scale)
    stages = [("pretraining", model_jobs(scale)), ("grpo teachers", teacher_jobs(scale)),
              ("ExPO merges", merge_jobs(scale, only)), ("experiments", experiment_jobs(scale, only=only))]
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    # concurrent.futures' workers may start processes of their own (the math grader's verifier); the
    # daemonic workers of multiprocessing.Pool may not.
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_initialize_worker)
    with pool, _progress(progress) as shown:
        _run_jobs(pool, workers, stages, root, scale, shown)
    results = [json.loads((root / job.name / RESULT).read_text()) for _, jobs in stages for job in jobs]
    return write_report(root, results, scale, seconds=time.perf_counter() - started, quick=quick)


def _run_jobs(pool, workers: int, stages: list[tuple[str, list[Job]]], root: Path, scale: Scale, shown) -> None:
    """Every job once the jobs that make its models have finished (plan.dependencies), at most one per
    worker at a time, so that the free worker takes the most urgent ready job: the one most other jobs wait
    for, then the longest. A stage is a group for the progress display, not a barrier: the sums teacher's
    students train while the large base still pretrains."""
    jobs = [job for _, group in stages for job in group]
    stage_of = {job.name: stage for stage, group in stages for job in group}
    needs = dependencies(jobs)
    waiting_on_it = _dependents(needs)
    finished = {job.name for job in jobs if (root / job.name / RESULT).exists()}
    for stage, group in stages:
        if group:  # e.g. no ExPO merges when --only leaves out distillation
            shown.start_stage(stage, total=len(group), done=sum(job.name in finished for job in group))
    pending = [job for job in jobs if job.name not in finished]
    pending.sort(key=lambda job: (-waiting_on_it[job.name], -job.config.get("train", {}).get("steps", 0)))
    running: dict[concurrent.futures.Future, Job] = {}
    try:
        while pending or running:
            ready = [job for job in pending if all(need in finished for need in needs[job.name])]
            if not ready and not running:  # cannot happen for an acyclic plan; never wait forever
                raise RuntimeError(f"lab jobs {[job.name for job in pending]} wait on jobs that never run")
            for job in ready[:workers - len(running)]:
                pending.remove(job)
                running[pool.submit(_execute_in_worker, (job, root, scale))] = job
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                result = future.result()
                finished.add(job.name)
                shown.job_done(stage_of[job.name], result)
    except BaseException:
        for future in running:
            future.cancel()
        raise


def _dependents(needs: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """How many jobs wait, directly or not, on each job."""
    direct: dict[str, set[str]] = {name: set() for name in needs}
    for name, required in needs.items():
        for need in required:
            direct[need].add(name)

    def below(name: str, seen: set[str]) -> set[str]:
        for child in direct[name] - seen:
            seen.add(child)
            below(child, seen)
        return seen

    return {name: len(below(name, set())) for name in needs}


def _progress(enabled: bool):
    """Progress of every stage: live rich bars on a terminal, one line per finished job in a log (rich
    would only print its bars once, at the end), nothing when progress is off."""
    if not enabled:
        return _Quiet()
    return _Bars() if sys.stdout.isatty() else _Lines()


class _Quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def start_stage(self, stage: str, total: int, done: int) -> None:
        pass

    def job_done(self, stage: str, result: dict) -> None:
        pass


class _Lines(_Quiet):
    def __enter__(self):
        self.started, self.total, self.done = time.perf_counter(), {}, {}
        return self

    def start_stage(self, stage: str, total: int, done: int) -> None:
        self.total[stage], self.done[stage] = total, done
        reused = f" ({done} reused from an earlier run)" if done else ""
        print(f"opd lab: {stage}: {total} jobs{reused}", flush=True)

    def job_done(self, stage: str, result: dict) -> None:
        self.done[stage] += 1
        elapsed = time.perf_counter() - self.started
        print(f"opd lab: {stage} {self.done[stage]}/{self.total[stage]}: {result['name']} in "
              f"{result['seconds']:.1f} s (lab {elapsed / 60:.1f} min)", flush=True)


class _Bars(_Quiet):
    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn())
        self.bars.__enter__()
        self.tasks = {}
        return self

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)
        return False

    def start_stage(self, stage: str, total: int, done: int) -> None:
        self.tasks[stage] = self.bars.add_task(stage, total=total, completed=done)

    def job_done(self, stage: str, result: dict) -> None:
        self.bars.advance(self.tasks[stage])
