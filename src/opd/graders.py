"""Outcome graders for training: `(row, completion) -> reward` in [0, 1].

Training uses them for `grpo`'s reward and logs the graded accuracy of every rollout batch whenever a
domain has a grader (both papers plot training accuracy). `exact` compares the final answer string; `math`
and `code` are the evaluation harness's graders (math-verify in worker processes; unit tests in the
subprocess sandbox), shared so that training reward and evaluation score agree.
"""

from __future__ import annotations

import re
from typing import Callable, Protocol

from opd.data import PromptRow


class Grader(Protocol):
    def __call__(self, row: PromptRow, completion: str) -> float: ...


_ANSWER_PATTERN = re.compile(r"(?:answer\s*[:=]?|=)\s*(-?[\w./-]+)\s*$", re.IGNORECASE)


def final_answer(completion: str) -> str:
    """The text after the last 'answer:' or '=' on the last non-empty line, else that whole line."""
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    match = _ANSWER_PATTERN.search(lines[-1])
    return (match.group(1) if match else lines[-1]).strip().rstrip(".")


def exact_grader(row: PromptRow, completion: str) -> float:
    """1 if the completion's final answer equals the row's `answer` as a string (after trimming)."""
    if row.answer is None:
        raise ValueError(f"row {row.index + 1} has no 'answer' to grade against")
    return float(final_answer(completion) == str(row.answer).strip())


def math_grader(row: PromptRow, completion: str) -> float:
    from opd.evaluate.graders import grade_math_answer

    if row.answer is None:
        raise ValueError(f"row {row.index + 1} has no 'answer' to grade against")
    return float(grade_math_answer(str(row.answer), completion))


def code_grader(row: PromptRow, completion: str) -> float:
    from opd.evaluate.graders import extract_code
    from opd.sandbox import check_program

    if not row.tests:
        raise ValueError(f"row {row.index + 1} has no 'tests' to run the completion against")
    tests = row.tests if isinstance(row.tests, str) else "\n".join(row.tests)
    return float(check_program(extract_code(completion), tests).passed)


GRADERS: dict[str, Callable[[PromptRow, str], float]] = {"exact": exact_grader, "math": math_grader,
                                                         "code": code_grader}


def build_grader(name: str) -> Grader:
    if name not in GRADERS:
        raise ValueError(f"unknown grader {name!r}; valid: {sorted(GRADERS)}")
    return GRADERS[name]
