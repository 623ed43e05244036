"""math-verify in worker processes: `MathVerifier.equal(gold, prediction)`, safe to call from any thread.

math-verify bounds parsing and comparison time with `signal.alarm`, which works only in a process's main
thread (in any other thread `parse` raises ValueError). So every comparison runs in the main thread of a
small pool of long-lived worker processes (`python -m opd.evaluate.math_worker`), one request at a time,
speaking JSON lines over pipes. A worker that overruns our own wall-clock limit (sympy can, now and then,
spin past its alarm) is killed and replaced; the comparison then counts as not equal.

Plain subprocesses rather than multiprocessing: a spawned multiprocessing child re-imports the parent's
`__main__` (for `opd` that is the whole CLI), and a forked one inherits torch's threads.

Left out: answer extraction (graders.py decides what text is compared) and caching.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import subprocess
import sys
import threading
from dataclasses import dataclass

# math-verify's own limits, enforced inside the worker by signals.
PARSE_TIMEOUT_SECONDS = 5
VERIFY_TIMEOUT_SECONDS = 5
# Our backstop from outside: two parses and a verify, plus room for a busy machine.
REQUEST_TIMEOUT_SECONDS = 30.0
# Worker start-up (importing sympy and math-verify) is not a request; it gets its own, longer allowance.
STARTUP_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    equal: bool
    reason: str  # "equal", "not equal", "gold not parsed", "answer not parsed", "timeout ...", "error ..."


def _as_math(text: str, is_answer: bool) -> str:
    # A bare answer ("x=3", "\frac12", "10\%") is wrapped in \boxed{} so that math-verify's LaTeX extraction
    # takes all of it; a whole completion is handed over as is and math-verify picks its final answer.
    return f"$\\boxed{{{text}}}$" if is_answer else text


def _compare(gold: str, prediction: str, prediction_is_answer: bool) -> dict:
    """Runs in the worker: parse both sides and compare (math-verify's timeouts active)."""
    from math_verify import parse, verify

    gold_parsed = parse(_as_math(gold, True), parsing_timeout=PARSE_TIMEOUT_SECONDS)
    if not gold_parsed:
        return {"equal": False, "reason": "gold not parsed"}
    predicted = parse(_as_math(prediction, prediction_is_answer), parsing_timeout=PARSE_TIMEOUT_SECONDS)
    if not predicted:
        return {"equal": False, "reason": "answer not parsed"}
    equal = bool(verify(gold_parsed, predicted, timeout_seconds=VERIFY_TIMEOUT_SECONDS))
    return {"equal": equal, "reason": "equal" if equal else "not equal"}


def serve() -> None:
    """The worker's loop: one JSON request per stdin line, one JSON verdict per stdout line."""
    import math_verify  # noqa: F401  (imported before the ready line, so start-up cost is not a request's)

    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            verdict = _compare(request["gold"], request["prediction"], request["prediction_is_answer"])
        except Exception as error:  # noqa: BLE001  (a bad input must not take the worker down)
            verdict = {"equal": False, "reason": f"error {type(error).__name__}: {str(error)[:200]}"}
        out.write(json.dumps(verdict) + "\n")
        out.flush()


class _Worker:
    def __init__(self) -> None:
        # stderr is discarded: math-verify logs every failed parse, and a pipe nobody reads would fill up.
        self.process = subprocess.Popen([sys.executable, "-m", "opd.evaluate.math_worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        if self._read(STARTUP_TIMEOUT_SECONDS) != {"ready": True}:
            self.kill()
            raise RuntimeError("the math-verify worker did not start (is math-verify installed?)")

    def _read(self, timeout: float) -> dict | None:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not readable:
            return None
        line = self.process.stdout.readline()
        return json.loads(line) if line else None

    def ask(self, request: dict, timeout: float) -> dict | None:
        """The worker's verdict, or None when it overran `timeout` or died (then it must be killed)."""
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        return self._read(timeout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


class MathVerifier:
    """A lazily started pool of `size` math-verify workers; `equal` blocks until one is free."""

    def __init__(self, size: int | None = None, timeout_seconds: float = REQUEST_TIMEOUT_SECONDS) -> None:
        self.size = size or max(1, min(4, os.cpu_count() or 1))
        self.timeout_seconds = timeout_seconds
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(self.size):
            self._idle.put(None)  # a slot whose worker starts on first use
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()

    def equal(self, gold: str, prediction: str, *, prediction_is_answer: bool = True) -> Verdict:
        """Whether `prediction` equals `gold` mathematically. `gold` is a bare answer; `prediction` is a bare
        answer too, or (prediction_is_answer=False) a whole completion whose final answer math-verify finds."""
        worker = self._idle.get()
        try:
            if worker is None:
                worker = self._start()
            request = {"gold": gold, "prediction": prediction, "prediction_is_answer": prediction_is_answer}
            verdict = worker.ask(request, self.timeout_seconds)
            if verdict is None:
                self._discard(worker)
                worker = None
                return Verdict(equal=False, reason=f"timeout after {self.timeout_seconds:.0f}s (worker replaced)")
            return Verdict(equal=verdict["equal"], reason=verdict["reason"])
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        with self._lock:
            workers, self._all = list(self._all), set()
        for worker in workers:
            worker.kill()

    def _start(self) -> _Worker:
        worker = _Worker()
        with self._lock:
            self._all.add(worker)
        return worker

    def _discard(self, worker: _Worker) -> None:
        with self._lock:
            self._all.discard(worker)
        worker.kill()


_SHARED: MathVerifier | None = None
_SHARED_LOCK = threading.Lock()


def shared_verifier() -> MathVerifier:
    """The process-wide pool, started on first use and killed at exit."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = MathVerifier()
            atexit.register(_SHARED.close)
        return _SHARED


if __name__ == "__main__":
    serve()
