"""Outcome graders for training: `(row, completion) -> reward` in [0, 1].

Training uses them for `grpo`'s reward and logs the graded accuracy of every rollout batch whenever a
domain has a grader (both papers plot training accuracy). `exact` compares the final answer string; `math` uses
math-verify in a worker process and `code` runs unit tests in the subprocess sandbox. The evaluation
harness (evaluate/grading.py) calls the same `check_math_answer` and `extract_code`, so a training reward
and an evaluation score agree.

Every grader is total: it returns a grade for any string, in bounded time.
- Answer extraction (`final_answer`, and `mc_letter` in evaluate/grading.py) reads only the last
  `ANSWER_WINDOW` characters of a completion, with patterns that run in linear time, so its time is bounded
  by the window. It still runs in `ANSWER_WORKER` under the literal `ANSWER_TIMEOUT_SECONDS`: a pattern
  that regresses to backtracking, or a stalled machine, then gives a failed grade instead of a hung run.
- Work whose time the window cannot bound (math-verify's parsing and symbolic comparison, Google's IFEval
  checker) runs in an `IsolatedWorker`: a spawned process with a timeout per call, replaced when it dies.
- Programs run in the sandbox, under its own limits.
A grade that could not be computed (a timeout, a worker that died twice on the same input, an exception
inside the checker) counts as wrong, is logged as a warning and is tallied in `grader_failures()`; the
evaluation harness also records it on the sample and per benchmark.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import multiprocessing
import multiprocessing.util
import re
import threading
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Protocol

from opd.data import PromptRow
from opd.grading.sandbox import check_program, memory_control

_LOG = logging.getLogger("opd.grading")


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


# ------------------------------------------------------------------ failures: counted, logged, never raised

_FAILURES: collections.Counter[str] = collections.Counter()
_FAILURES_LOCK = threading.Lock()


def grader_failures() -> dict[str, int]:
    """Grades this process counted as wrong because grading itself failed, by cause ('timeout',
    'worker died', 'error'), since it started. Each one was also logged as a warning."""
    with _FAILURES_LOCK:
        return dict(_FAILURES)


def failure_count() -> int:
    """All grades this process counted as wrong because grading failed, whatever the cause."""
    with _FAILURES_LOCK:
        return sum(_FAILURES.values())


def _record_failure(cause: str, detail: str) -> None:
    with _FAILURES_LOCK:
        _FAILURES[cause] += 1
    _LOG.warning("opd: grader %s: %s; the answer counts as wrong", cause, detail)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an isolated call returned, or why it returned nothing (`failure`: timeout, worker died, error)."""
    value: Any = None
    failure: str | None = None
    detail: str = ""


class _Stuck(Exception):
    """An isolated call (or its worker's start) ran past its limit."""


class _StartFailed(Exception):
    """A new worker's warm-up raised: not a property of any answer, so the error is raised, not counted."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class IsolatedWorker:
    """Runs picklable functions in one spawned worker process, one call at a time, each under a timeout.

    math-verify bounds its parsing with signals, which work only in a process's main thread, and a process
    can be killed where a thread cannot. Calls are serialised (graders run in thread pools): each takes about
    a millisecond, and the timeout must measure this job alone, not a queue of other threads' jobs; the
    worker's start (imports) has its own, longer, limit.

    Total: a call that runs past the timeout kills the worker (a fresh one starts on the next call); a
    worker that dies (os._exit, a segfault, the OOM killer) is replaced and the call retried once in the new
    one, and if that one dies too the input is given up on. An exception raised by the function is a failure
    too, except ImportError; an error in the worker's warm-up is raised as it is (a missing package or
    data set is an installation problem, not a wrong answer). Each failure is recorded
    (`grader_failures()`, a warning) and returned as `Outcome(failure=...)`.
    """

    def __init__(self, name: str, timeout_seconds: float, warm: Callable[[], None] | None = None,
                 start_timeout_seconds: float = 300.0):
        self.name, self.timeout_seconds, self.start_timeout_seconds = name, timeout_seconds, start_timeout_seconds
        self._warm = warm  # runs once in each new worker before its first call (its imports), outside the timeout
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._finalizer = None
        self._lock = threading.Lock()

    def call(self, function: Callable[..., Any], *args: Any) -> Outcome:
        with self._lock:
            for attempt in (1, 2):
                try:
                    return Outcome(value=self._run(function, args))
                except _Stuck as stuck:
                    self._discard()
                    return self._failed("timeout", str(stuck))
                except BrokenProcessPool:
                    self._discard()
                    if attempt == 2:
                        return self._failed("worker died", f"the {self.name} worker died twice on the same input")
                except _StartFailed as failed:
                    raise failed.error from None
                except ImportError:
                    raise
                except Exception as error:  # raised inside the worker by the function itself
                    return self._failed("error", f"{self.name} raised {type(error).__name__}: {error}")
        raise AssertionError("unreachable: the second attempt returns")

    def close(self) -> None:
        with self._lock:
            self._discard()

    def _failed(self, cause: str, detail: str) -> Outcome:
        _record_failure(cause, detail)
        return Outcome(failure=cause, detail=detail)

    def _run(self, function: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        if self._pool is None:
            pool = concurrent.futures.ProcessPoolExecutor(max_workers=1,
                                                          mp_context=multiprocessing.get_context("spawn"))
            # Inside a multiprocessing worker (the lab's pool, a user's), exit joins child processes before
            # the threading atexit hook that would stop this pool runs: without this finaliser the exit waits
            # forever on the idle worker. It must run before the pool's queues close (their finalisers have
            # priority 10), or the worker never receives its stop signal.
            self._finalizer = multiprocessing.util.Finalize(None, pool.shutdown, exitpriority=100)
            self._pool = pool
            if self._warm is not None:
                try:
                    self._wait(pool.submit(self._warm), self.start_timeout_seconds, "to start")
                except (_Stuck, BrokenProcessPool):
                    raise
                except Exception as error:  # a missing package or data: the installation's problem, raised
                    self._discard()
                    raise _StartFailed(error) from error
        return self._wait(self._pool.submit(function, *args), self.timeout_seconds, "")

    def _wait(self, future: concurrent.futures.Future, seconds: float, what: str) -> Any:
        try:
            return future.result(timeout=seconds)
        except concurrent.futures.TimeoutError:
            raise _Stuck(f"{self.name} took more than its {seconds:g} s limit{' ' + what if what else ''}") from None

    def _discard(self) -> None:
        """Stop the worker (killed: it may be stuck) and forget the pool; the next call starts a fresh one."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        if self._finalizer is not None:
            self._finalizer.cancel()
            self._finalizer = None


# ------------------------------------------------------------------ exact

# Extraction takes microseconds on the bounded window; the limit is a backstop that should never fire. The
# window, not the whole completion, is what crosses to the worker (a ~0.5 ms round trip per grade).
ANSWER_TIMEOUT_SECONDS = 5.0
ANSWER_WORKER = IsolatedWorker("answer extraction", ANSWER_TIMEOUT_SECONDS)


def extract_in_worker(extract: Callable[[str], Any], completion: str) -> Outcome:
    """`extract(window)` (a module-level function: it is pickled) in ANSWER_WORKER, under its timeout; a
    failure is recorded (`grader_failures()`) and returned as `Outcome(failure=...)`."""
    return ANSWER_WORKER.call(extract, answer_window(completion))


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
    """1 if the completion's final answer equals the row's `answer` as a string (after trimming); 0 when the
    extraction ran past ANSWER_TIMEOUT_SECONDS."""
    if row.answer is None:
        raise ValueError(f"row {row.index + 1} has no 'answer' to grade against")
    outcome = extract_in_worker(final_answer, completion)
    if outcome.failure is not None:  # counted wrong (and tallied as a failure)
        return 0.0
    return float(outcome.value == str(row.answer).strip())


# ------------------------------------------------------------------ math

# A verification takes about a millisecond; one that takes 10 s is stuck in sympy (a tower of powers, a
# huge factorial) and counts as wrong.
MATH_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Verdict:
    correct: bool
    failure: str | None = None  # why grading itself failed (timeout, worker died, error); correct is False
    detail: str = ""


def _warm_math() -> None:
    import math_verify  # noqa: F401  (sympy and the latex parser: seconds, once per worker)


def _verify_in_worker(gold: str, completion: str) -> bool:
    from math_verify import parse, verify  # imported in the spawned verifier process, not the trainer

    gold_parsed = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$")
    return bool(verify(gold_parsed, parse(completion)))


_MATH_WORKER = IsolatedWorker("math-verify", MATH_TIMEOUT_SECONDS, warm=_warm_math)


def check_math_answer(gold: str, completion: str) -> Verdict:
    """Whether the completion's final answer is mathematically equal to `gold` (math-verify), or why that
    could not be decided (then counted as wrong)."""
    outcome = _MATH_WORKER.call(_verify_in_worker, gold, completion)
    if outcome.failure is not None:
        return Verdict(correct=False, failure=outcome.failure, detail=outcome.detail)
    return Verdict(correct=bool(outcome.value))


def grade_math_answer(gold: str, completion: str) -> bool:
    """True when the completion's final answer is mathematically equal to `gold` (math-verify)."""
    return check_math_answer(gold, completion).correct


def math_grader(row: PromptRow, completion: str) -> float:
    if row.answer is None:
        raise ValueError(f"row {row.index + 1} has no 'answer' to grade against")
    return float(grade_math_answer(str(row.answer), completion))


# ------------------------------------------------------------------ code

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
