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


def read_responses(path: str, problems: list[Problem]) -> dict[str, list[str]]:
    """Responses produced elsewhere: JSON lines {"problem_id": ..., "completion": ...} (one per sample)."""
    known = {p.problem_id for p in problems}
    responses: dict[str, list[str]] = defaultdict(list)
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem_id, completion = str(record["problem_id"]), record["completion"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: expected {{\"problem_id\", \"completion\"}} ({error})") from None
        if problem_id not in known:
            raise ValueError(f"{path}:{number}: unknown problem_id {problem_id!r} for this benchmark")
        responses[problem_id].append(completion)
    return dict(responses)


def score(problems: list[Problem], completions: dict[str, list[str]], on_grade=None) -> dict:
    """Grade every sample; per-benchmark avg@k and pass@k, and every sample with its grade and reason."""
    answered = [p for p in problems if completions.get(p.problem_id)]
    pairs = [(p, c) for p in answered for c in completions[p.problem_id]]
    grades = iter(grade_all(pairs, on_grade=on_grade))
    samples, per_problem = [], []
    instruction_levels: dict[str, list[float]] = defaultdict(list)
    for problem in answered:
        flags = []
        for completion in completions[problem.problem_id]:
            graded = next(grades)
            flags.append(graded.correct)
            samples.append({"problem_id": problem.problem_id, "completion": completion, "correct": graded.correct,
                            "reason": graded.reason})
            if graded.instructions is not None:
                for mode, followed in graded.instructions.items():
                    instruction_levels[f"prompt_level_{mode}"].append(float(all(followed)))
                    instruction_levels[f"instruction_level_{mode}"].extend(float(f) for f in followed)
        per_problem.append(flags)
    k = min((len(f) for f in per_problem), default=0)
    extra = {"ifeval": {name: sum(v) / len(v) for name, v in sorted(instruction_levels.items())}} if instruction_levels else {}
    return {
        **extra,
        "problems": len(answered),
        "samples_per_problem": k,
        "avg_at_k": sum(average_at_k(f) for f in per_problem) / len(per_problem) if per_problem else 0.0,
        "pass_at_k": {str(j): sum(pass_at_k(len(f), sum(f), j) for f in per_problem) / len(per_problem)
                      for j in sorted({1, k}) if k >= j >= 1},
        "samples": samples,
    }


def evaluate(benchmarks: list[str], settings: EvalSettings, output_dir: str, model_dir: str | None = None,
             responses_path: str | None = None) -> dict:
    """Run (or grade given responses for) each benchmark; writes results.json; returns the results."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"settings": asdict(settings), "model": model_dir, "benchmarks": {}}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[rate]}"))
    with Progress(*columns, transient=True) as progress:
        for name in benchmarks:
            problems = load_benchmark(name)[: settings.limit]
            if responses_path is not None:
                completions = read_responses(responses_path, problems)
            else:
                task = progress.add_task(f"{name}: sampling", total=len(problems) * settings.samples, rate="")
                sampled = {"count": 0, "started": time.perf_counter()}

                def advance(count, task=task, sampled=sampled):
                    sampled["count"] += count
                    rate = sampled["count"] / (time.perf_counter() - sampled["started"])
                    progress.update(task, advance=count, rate=f"{rate:.1f} samples/s")

                completions = generate_completions(model_dir, problems, settings, out / "cache", progress=advance)
            total = sum(len(v) for v in completions.values())
            task = progress.add_task(f"{name}: grading", total=total, rate="")
            tally = {"graded": 0, "correct": 0}

            def graded(result, task=task, tally=tally):
                tally["graded"] += 1
                tally["correct"] += result.correct
                progress.update(task, advance=1, rate=f"accuracy {tally['correct'] / tally['graded']:.3f}")

            results["benchmarks"][name] = {"domain": BENCHMARKS[name].domain,
                                           **score(problems, completions, on_grade=graded)}
            progress.remove_task(task)
    domains: dict[str, list[float]] = defaultdict(list)
    for name, result in results["benchmarks"].items():
        domains[result["domain"]].append(result["avg_at_k"])
    results["domains"] = {d: sum(v) / len(v) for d, v in sorted(domains.items())}
    write_text_atomically(out / "results.json", json.dumps(results, indent=2))
    return results


def format_table(results: dict) -> str:
    lines = ["| benchmark | domain | problems | k | avg@k | pass@1 | pass@k |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results["benchmarks"].items():
        k = r["samples_per_problem"]
        lines.append(f"| {name} | {r['domain']} | {r['problems']} | {k} | {r['avg_at_k']:.3f} | "
                     f"{r['pass_at_k'].get('1', 0.0):.3f} | {r['pass_at_k'].get(str(k), 0.0):.3f} |")
    for domain, value in results["domains"].items():
        lines.append(f"| **{domain} average** | | | | {value:.3f} | | |")
    ifeval = results["benchmarks"].get("ifeval", {}).get("ifeval")
    if ifeval:
        lines.append("\nIFEval: " + ", ".join(f"{name.replace('_', ' ')} {value:.3f}" for name, value in ifeval.items()))
    return "\n".join(lines)
