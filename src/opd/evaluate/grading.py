"""Grading one completion of one benchmark problem, and the metrics over samples (avg@k, pass@k)."""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor

from opd.evaluate import ifeval
from opd.evaluate.custom import grade_with_custom
from opd.evaluate.problem import Grade, Problem
from opd.grading.graders import IsolatedWorker, answer_window, check_math_answer, extract_code, extract_in_worker
from opd.grading.sandbox import SandboxLimits, check_program

CODE_LIMITS = SandboxLimits(timeout_seconds=10.0)

# Google's IFEval checker runs its own regexes over the whole response (some backtrack: a bullet-list check
# over a run of blank lines takes quadratic time), so it runs in a worker process that a timeout can stop.
IFEVAL_WORKER = IsolatedWorker("the IFEval checker", timeout_seconds=10.0, warm=ifeval.warm_checker)


# Each pattern is unambiguous (no two adjacent quantifiers can match the same characters, and `^` does not
# reach across blank lines), so a search costs time linear in the text, which `answer_window` also caps.
_MC_PATTERNS = (
    re.compile(r"answer\s*(?:(?:is|:)\s*)?\**\(?([A-J])\)?\**(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"\\boxed\{\s*\(?([A-J])\)?\s*\}"),
    # A line that is just a letter, or starts with "B." / "B)" / "B:" (not the pronoun "I pick...").
    re.compile(r"^[^\S\n]*\**\(?([A-J])(?:[).:]\**(?:\s|$)|\**[^\S\n]*$)", re.MULTILINE),
    re.compile(r"\(([A-J])\)"),
)


def mc_letter(completion: str) -> str | None:
    """The option letter a completion commits to: the last 'answer is X', boxed letter, a line starting
    with a letter, or a parenthesised letter, tried in that order, in the completion's last
    `ANSWER_WINDOW` characters."""
    text = answer_window(completion)
    for pattern in _MC_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return None


def humaneval_program(problem: Problem, completion: str) -> str:
    """The stub followed by the completion: a continuation of the body, or a full re-definition."""
    entry = problem.payload["entry_point"]
    code = extract_code(completion)
    if re.search(rf"^def {re.escape(entry)}\s*\(", code, re.MULTILINE):
        return problem.payload["stub"] + "\n    pass\n\n" + code
    return problem.payload["stub"] + completion


def grade(problem: Problem, completion: str) -> Grade:
    if "grader" in problem.payload:  # a benchmark file's row, graded by the user's grader (evaluate/custom.py)
        return grade_with_custom(problem, completion)
    if problem.domain == "math":
        verdict = check_math_answer(problem.answer, completion)
        if verdict.failure is not None:
            return Grade(correct=False, reason=f"math-verify: {verdict.detail} (counted wrong)",
                         failure=verdict.failure)
        return Grade(correct=verdict.correct,
                     reason="math-verify: equal" if verdict.correct else "math-verify: not equal")
    if problem.benchmark == "humaneval":
        tests = problem.payload["test"] + f"\n\ncheck({problem.payload['entry_point']})\n"
        result = check_program(humaneval_program(problem, completion), tests, CODE_LIMITS)
        return Grade(correct=result.passed, reason=result.reason)
    if problem.benchmark == "mbpp":
        # MBPP's setup code uses the solution's own definitions (e.g. its Node class): it runs after them,
        # as the start of the tests (benchmark code: it runs in the trusted test process, calling into the program's).
        tests = problem.payload["setup"] + "\n" + problem.payload["tests"]
        result = check_program(extract_code(completion), tests, CODE_LIMITS)
        return Grade(correct=result.passed, reason=result.reason)
    if problem.benchmark == "ifeval":
        outcome = IFEVAL_WORKER.call(ifeval.check, problem.prompt, problem.payload["instruction_ids"],
                                     problem.payload["kwargs"], completion)
        if outcome.failure is not None:  # every instruction counts as not followed, at both levels
            unfollowed = [False] * len(problem.payload["instruction_ids"])
            return Grade(correct=False, reason=f"IFEval: {outcome.detail} (counted wrong)", failure=outcome.failure,
                         instructions={"strict": unfollowed, "loose": unfollowed})
        followed = outcome.value
        strict, loose = followed["strict"], followed["loose"]
        return Grade(correct=all(strict), reason=f"strict {sum(strict)}/{len(strict)}, loose {sum(loose)}/{len(loose)}",
                     instructions=followed)
    if problem.domain == "stem":
        outcome = extract_in_worker(mc_letter, completion)  # under the literal ANSWER_TIMEOUT_SECONDS
        if outcome.failure is not None:
            return Grade(correct=False, reason=f"option letter: {outcome.detail} (counted wrong)",
                         failure=outcome.failure)
        letter = outcome.value
        if letter is None:
            return Grade(correct=False, reason="no option letter found")
        return Grade(correct=letter == problem.answer, reason=f"chose {letter}, gold {problem.answer}")
    raise ValueError(f"no grader for benchmark {problem.benchmark!r}")


def grade_all(pairs: list[tuple[Problem, str]], workers: int = 4, on_grade=None) -> list[Grade]:
    """Grade many (problem, completion) pairs; code runs in parallel sandboxes. `on_grade(grade)` is called
    as each result arrives, in order (for a running accuracy)."""
    grades = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(lambda pair: grade(*pair), pairs):
            grades.append(result)
            if on_grade is not None:
                on_grade(result)
    return grades


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k)."""
    if k > samples:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {samples}")
    if samples - correct < k:
        return 1.0
    return 1.0 - math.prod((samples - correct - i) / (samples - i) for i in range(k))


def average_at_k(correct_flags: list[bool]) -> float:
    """avg@k: mean accuracy over the k samples (the papers' metric)."""
    return sum(correct_flags) / len(correct_flags) if correct_flags else 0.0

