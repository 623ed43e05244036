"""What every evaluation module shares: a benchmark problem, the grade of one completion, and the error a
missing or changed benchmark carrier raises. It imports nothing of opd, so that benchmarks.py, ifeval.py and
grading.py depend on it and not on each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class BenchmarkDataError(RuntimeError):
    pass


@dataclass(frozen=True, kw_only=True, slots=True)
class Problem:
    benchmark: str
    problem_id: str
    domain: str  # math | code | stem
    prompt: str | list[dict[str, str]]  # the user message (a benchmark file row: also chat messages)
    answer: str  # gold answer (math, MC letter), or the reference solution (code)
    payload: dict[str, Any] = field(default_factory=dict)  # tests, entry point, choices


@dataclass(frozen=True, kw_only=True, slots=True)
class Grade:
    correct: bool
    reason: str
    instructions: dict[str, list[bool]] | None = None  # ifeval: per instruction, strict and loose
    failure: str | None = None  # why grading itself failed (timeout, worker died, error): counted wrong, reported
