"""A benchmark of the user's own: a prompt file (training's data format, data.py) graded by a custom grader.

`opd eval MODEL --benchmarks my.jsonl --grader module:function` (or a name given to
`opd.grading.custom.register_grader`): each row is a problem, its id the row's `id` field (else its line
number), and the grader the one training uses, `(row, completion) -> reward in [0, 1]`, called on the row
as training would see it. A sample is correct when its reward is 1; the reward is recorded with it. A
grader that raises, runs past its timeout or returns something that is not a reward stops the evaluation
naming the benchmark, the problem id and the row's file:line: a bug in the grader is never a wrong answer.
The samples drawn before it are cached, so a fixed grader re-grades without sampling again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from opd.data import load_prompts
from opd.evaluate.problem import Grade, Problem
from opd.grading.custom import GraderError, checked, grader_problem, resolve
from opd.grading.graders import GRADERS

BENCHMARK_FILE_SUFFIXES = (".jsonl", ".parquet")


def is_benchmark_file(name: str) -> bool:
    """A benchmark named by a file (the built-in ones are plain names)."""
    return name.endswith(BENCHMARK_FILE_SUFFIXES)


def check_graders(benchmarks: list[str], grader: str | None) -> None:
    """Before any sampling: every benchmark file has a grader, the grader resolves, and applies to one."""
    files = [name for name in benchmarks if is_benchmark_file(name)]
    if files and grader is None:
        raise ValueError(f"opd eval: benchmark file {files[0]} needs --grader module:function (or a name "
                         "registered with opd.grading.custom.register_grader) to grade its rows")
    if grader is not None and not files:
        raise ValueError(f"opd eval --grader {grader}: applies to benchmark files (.jsonl, .parquet) only, and "
                         f"{', '.join(benchmarks)} are built-in benchmarks with their own graders")
    if grader is not None:
        if grader == "none" or grader in GRADERS:
            raise ValueError(f"opd eval --grader {grader}: a custom grader (module:function or a registered name) "
                             f"is needed; the built-in {sorted(GRADERS)} grade training rollouts")
        problem = grader_problem(grader, "opd eval --grader")
        if problem is not None:
            raise ValueError(problem)
        for name in files:
            if not Path(name).is_file():
                raise ValueError(f"opd eval: benchmark file {name} does not exist")


def load_benchmark_file(path: str, grader: str) -> list[Problem]:
    """The rows of `path` as problems, each carrying its row and the checked grader that grades it."""
    function = checked(resolve(grader), grader)
    problems, seen = [], {}
    for row in load_prompts(path, default_domain="custom"):
        identity = str(row.extra.get("id", row.index + 1))
        if identity in seen:
            raise ValueError(f"{row.where}: problem id {identity!r} repeats {seen[identity]}; ids must be unique")
        seen[identity] = row.where
        problems.append(Problem(benchmark=path, problem_id=identity, domain=row.domain, prompt=row.messages,
                                answer="" if row.answer is None else str(row.answer),
                                payload={"row": row, "grader": (grader, function)}))
    return problems


def file_domain(problems: list[Problem]) -> str:
    """The domain a benchmark file's average goes under: its rows' one domain, else 'custom'."""
    domains = {p.domain for p in problems}
    return domains.pop() if len(domains) == 1 else "custom"


def file_digest(path: str) -> str:
    """The content of a benchmark file, for the sample cache's key: an edited file is sampled afresh."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def grade_with_custom(problem: Problem, completion: str) -> Grade:
    spec, function = problem.payload["grader"]
    try:
        reward = function(problem.payload["row"], completion)
    except GraderError as error:
        raise GraderError(f"opd eval: {problem.benchmark} problem {problem.problem_id!r}: {error}") from None
    return Grade(correct=reward == 1.0, reason=f"{spec}: reward {reward:g}")
