"""Graders the user brings: `module:function` named in `teachers.N.grader`, or a name registered from Python.

A custom grader has the built-in graders' signature, `(row: PromptRow, completion: str) -> float`, and
returns a reward in [0, 1] (1 = correct; training accuracy is the mean reward). It is found at config load
(`grader_problem`: the module imports, the function exists, is callable and takes two arguments), or the
config is refused naming the key. At grading time (`checked`) it runs in the training process (the user's
own, trusted code) under CUSTOM_TIMEOUT_SECONDS; an exception, a timeout, or a return that is not a finite
number in [0, 1] stops the run with the grader, the row (file:line or index) and its domain: a bug in user
code is never a silent zero reward. (Built-in graders count their own timeouts as wrong answers, because
their workers can be killed; a thread running user code cannot, so a stuck one stops the run.)
"""

from __future__ import annotations

import concurrent.futures
import importlib
import inspect
import math
import numbers
import threading
from typing import Callable

from opd.data import PromptRow
from opd.grading.graders import GRADERS, Grader, build_grader

GraderFunction = Callable[[PromptRow, str], float]
CUSTOM_TIMEOUT_SECONDS = 60.0

_REGISTERED: dict[str, GraderFunction] = {}
_LOCK = threading.Lock()


class GraderError(ValueError):
    """A custom grader that raised, ran past its timeout, or returned something that is not a reward."""


def register_grader(name: str, function: GraderFunction) -> None:
    """Make `function` usable as `grader: NAME` in this process (before building the config)."""
    if not name or ":" in name or name in GRADERS or name == "none":
        raise ValueError(f"register_grader: {name!r} cannot be a grader name (built-in: {sorted(GRADERS)}; "
                         "':' is reserved for module:function)")
    problem = _signature_problem(function)
    if problem:
        raise ValueError(f"register_grader: {name!r}: {problem}")
    with _LOCK:
        _REGISTERED[name] = function


def unregister_grader(name: str) -> None:
    with _LOCK:
        _REGISTERED.pop(name, None)


def grader_problem(spec: str, key: str) -> str | None:
    """Why `spec` names no usable grader (a message starting with `key`), or None."""
    if spec == "none" or spec in GRADERS:
        return None
    try:
        resolve(spec)
    except GraderError as error:
        return f"{key}: {error}"
    return None


def resolve(spec: str) -> GraderFunction:
    """The function a custom spec names: a registered name, else `module:function` imported."""
    if spec in _REGISTERED:
        return _REGISTERED[spec]
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise GraderError(f"{spec!r} is not a grader; built-in: {['none', *sorted(GRADERS)]}, registered: "
                          f"{sorted(_REGISTERED)}, or 'module:function' for your own")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any failure to import is reported the same way, with its cause
        raise GraderError(f"{spec!r}: module {module_name!r} could not be imported ({type(error).__name__}: "
                          f"{error}); is it on PYTHONPATH?") from None
    function = getattr(module, attribute, None)
    if function is None:
        raise GraderError(f"{spec!r}: module {module_name!r} has no {attribute!r}")
    problem = _signature_problem(function)
    if problem:
        raise GraderError(f"{spec!r}: {problem}")
    return function


def _signature_problem(function) -> str | None:
    if not callable(function):
        return f"{function!r} is not callable"
    try:
        inspect.signature(function).bind(None, "")
    except TypeError as error:
        return f"must take (row, completion), but {error}"
    except ValueError:  # no signature to read (a builtin): called and judged at grading time
        return None
    return None


def make_grader(spec: str) -> Grader:
    """The grader a config names: a built-in one as it is, a custom one wrapped by `checked`."""
    return build_grader(spec) if spec in GRADERS else checked(resolve(spec), spec)


def checked(function: GraderFunction, spec: str, timeout_seconds: float = CUSTOM_TIMEOUT_SECONDS) -> Grader:
    """`function` under a timeout, with its exceptions and non-reward returns raised as GraderError."""

    def grade(row: PromptRow, completion: str) -> float:
        where = f"{row.where or f'row {row.index + 1}'} (domain '{row.domain}')"
        outcome: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            try:
                outcome.set_result(function(row, completion))
            except BaseException as error:  # noqa: BLE001 - handed to the waiting thread, raised there
                outcome.set_exception(error)
        # A daemon thread: one stuck past the timeout cannot keep the process from exiting.
        threading.Thread(target=call, name=f"opd grader {spec}", daemon=True).start()
        try:
            value = outcome.result(timeout=timeout_seconds)
        except concurrent.futures.TimeoutError:
            raise GraderError(f"grader {spec!r} took more than {timeout_seconds:g} s on {where}; it runs in the "
                              "training process and cannot be stopped, so the run stops") from None
        except Exception as error:
            raise GraderError(f"grader {spec!r} raised {type(error).__name__}: {error} on {where}") from error
        if isinstance(value, bool):
            return float(value)
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)) or not 0 <= float(value) <= 1:
            raise GraderError(f"grader {spec!r} returned {value!r} on {where}; a grader returns a finite reward "
                              "in [0, 1] (1 = correct)")
        return float(value)

    return grade
