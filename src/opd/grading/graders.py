"""Outcome graders for training: `(row, completion) -> reward` in [0, 1].

Training uses them for `grpo`'s reward and logs the graded accuracy of every rollout batch whenever a
domain has a grader (both papers plot training accuracy). `exact` compares the final answer string; `math` uses
math-verify in a worker process and `code` runs unit tests in the subprocess sandbox. The evaluation
harness (evaluate/grading.py) calls the same `grade_math_answer` and `extract_code`, so a training reward
and an evaluation score agree.

Answer extraction (`final_answer`, and `mc_letter` in evaluate/grading.py) reads only the last
`ANSWER_WINDOW` characters of a completion, with patterns that run in linear time: their time is bounded by
the window, however long (or hostile) the completion.
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
from opd.grading.sandbox import check_program


class Grader(Protocol):
    def __call__(self, row: PromptRow, completion: str) -> float: ...


# The final answer sits at the end of a completion: extraction reads only its last ANSWER_WINDOW characters
# (after trailing whitespace), about 2,000 tokens, which bounds the time of every extraction pattern however
# long (or hostile) the completion is. A completion that states its answer earlier than that and then keeps
# writing is graded on what it wrote last.
ANSWER_WINDOW = 8192


def answer_window(completion: str) -> str:
    """The part of a completion that answer extraction reads: its last ANSWER_WINDOW characters, trailing
    whitespace ignored."""
    return completion.rstrip()[-ANSWER_WINDOW:]


_MARKER_WORD = re.compile("answer", re.IGNORECASE)
_TOKEN_CHARACTERS = re.compile(r"[\w./-]+")


def final_answer(completion: str) -> str:
    """The last line's final token when an 'answer', 'answer:' or '=' (spaces allowed) comes right before it
    (an 'answer' glued to it included: 'answer42'), else that whole line; trailing dots dropped.

    A token is a run of word characters, '.', '/' and '-'. Written as scans from the end of the line rather
    than one backtracking pattern (whose cost grew with the square of a line of spaces or of 'answer's).
    """
    lines = answer_window(completion).splitlines()
    line = next((stripped for stripped in map(str.strip, reversed(lines)) if stripped), "")
    found = _TOKEN_CHARACTERS.match(line[::-1])  # the final token, read backwards: anchored, linear
    if found is None:
        return line.rstrip(".")
    start = len(line) - found.end()
    token, before = line[start:], line[:start].rstrip()
    if before.endswith("=") or _ends_with_answer(before[:-1].rstrip() if before.endswith(":") else before):
        return token.rstrip(".")
    glued = _MARKER_WORD.search(token)
    if glued is not None and glued.end() < len(token):
        return token[glued.end():].rstrip(".")
    return line.rstrip(".")


def _ends_with_answer(text: str) -> bool:
    return _MARKER_WORD.fullmatch(text[-len("answer"):]) is not None


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
    if not row.tests:
        raise ValueError(f"row {row.index + 1} has no 'tests' to run the completion against")
    tests = row.tests if isinstance(row.tests, str) else "\n".join(row.tests)
    return float(program_passes(extract_code(completion), tests))


GRADERS: dict[str, Callable[[PromptRow, str], float]] = {"exact": exact_grader, "math": math_grader,
                                                         "code": code_grader}


def build_grader(name: str) -> Grader:
    if name not in GRADERS:
        raise ValueError(f"unknown grader {name!r}; valid: {sorted(GRADERS)}")
    return GRADERS[name]
