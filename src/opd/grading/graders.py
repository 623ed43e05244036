"""Outcome graders for training: `(row, completion) -> reward` in [0, 1].

Training uses them for `grpo`'s reward and logs the graded accuracy of every rollout batch whenever a
domain has a grader (both papers plot training accuracy). `exact` compares the final answer string; `math` uses
math-verify in a worker process and `code` runs unit tests in the subprocess sandbox. The evaluation
harness (evaluate/grading.py) calls the same `grade_math_answer` and `extract_code`, so a training reward
and an evaluation score agree.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import multiprocessing.util
import re
import threading
from functools import lru_cache
from typing import Callable, Protocol

from opd.data import PromptRow
from opd.grading.sandbox import check_program, memory_control


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


# math-verify bounds its parsing and comparison time with signals, which work only in a process's main
# thread: verification runs in a small pool of worker processes, never in our threads.
_MATH_POOL = None
_MATH_TIMEOUT_SECONDS = 10.0
_MATH_LOCK = threading.Lock()


def _verify_in_worker(gold: str, completion: str) -> bool:
    from math_verify import parse, verify  # imported in the spawned verifier process, not the trainer

    gold_parsed = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$")
    return bool(verify(gold_parsed, parse(completion)))


def grade_math_answer(gold: str, completion: str) -> bool:
    """True when the completion's final answer is mathematically equal to `gold` (math-verify).

    Calls are serialised (graders run in thread pools): each verification takes about a millisecond, and
    the timeout must measure this job alone, not a queue of other threads' jobs.
    """
    global _MATH_POOL
    with _MATH_LOCK:
        if _MATH_POOL is None:
            _MATH_POOL = concurrent.futures.ProcessPoolExecutor(max_workers=1,
                                                                mp_context=multiprocessing.get_context("spawn"))
            # Inside a multiprocessing worker (the lab's pool, a user's), exit joins child processes before
            # the threading atexit hook that would stop this pool runs: without this finaliser the exit waits
            # forever on the idle verifier. It must run before the pool's queues close (their finalisers
            # have priority 10), or the verifier never receives its stop signal.
            multiprocessing.util.Finalize(None, _MATH_POOL.shutdown, exitpriority=100)
        future = _MATH_POOL.submit(_verify_in_worker, gold, completion)
        try:
            return future.result(timeout=_MATH_TIMEOUT_SECONDS)
        except concurrent.futures.TimeoutError:
            # A stuck worker: stop it and start a fresh pool next time; the answer counts as wrong.
            for process in list(getattr(_MATH_POOL, "_processes", {}).values()):
                process.kill()
            _MATH_POOL.shutdown(wait=False, cancel_futures=True)
            _MATH_POOL = None
            return False


def math_grader(row: PromptRow, completion: str) -> float:
    if row.answer is None:
        raise ValueError(f"row {row.index + 1} has no 'answer' to grade against")
    return float(grade_math_answer(str(row.answer), completion))


_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The program in a chat answer: the first fenced block that defines something, else the last fenced
    block, else the whole text (a base model's plain continuation)."""
    blocks = _CODE_BLOCK.findall(completion)
    if not blocks:
        return completion
    return next((b for b in blocks if "def " in b or "class " in b), blocks[-1])


@lru_cache(maxsize=1 << 16)
def program_passes(program: str, tests: str) -> bool:
    """One sandbox run per distinct (program, tests): an RL policy repeats its programs across samples and
    steps, and a sandbox start costs ~70 ms. A program is judged once; its verdict (a timeout included) stands."""
    return check_program(program, tests).passed


def code_grader(row: PromptRow, completion: str) -> float:
    """1 when the completion's program and then the row's tests ran to their end in the sandbox (an exit
    before the tests' end, of any status, is 0; see sandbox.py for what a pass proves)."""
    if not row.tests:
        raise ValueError(f"row {row.index + 1} has no 'tests' to run the completion against")
    tests = row.tests if isinstance(row.tests, str) else "\n".join(row.tests)
    return float(program_passes(extract_code(completion), tests))


GRADERS: dict[str, Callable[[PromptRow, str], float]] = {"exact": exact_grader, "math": math_grader,
                                                         "code": code_grader}


def build_grader(name: str) -> Grader:
    if name not in GRADERS:
        raise ValueError(f"unknown grader {name!r}; valid: {sorted(GRADERS)}")
    if name == "code":
        memory_control()  # at start-up, not at the first reward: logs a warning where only rlimits cap memory
    return GRADERS[name]
