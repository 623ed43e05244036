"""Training graders: exact final answers, math equivalence through math-verify, code through the sandbox."""

from __future__ import annotations

import re

import pytest

from opd.data import PromptRow
from opd.grading.graders import build_grader, extract_code, final_answer, grade_math_answer


def row(answer=None, tests=None):
    return PromptRow(index=0, prompt="q", domain="d", answer=answer, tests=tests)


@pytest.mark.parametrize("completion, expected", [
    ("12 + 7 = 19", "19"), ("answer: 42", "42"), ("work\nanswer: -3.5.", "-3.5"), ("", ""), ("hello", "hello"),
])
def test_final_answer(completion, expected):
    assert final_answer(completion) == expected


def test_exact_grader():
    grade = build_grader("exact")
    assert grade(row("19"), "12 + 7 = 19") == 1.0
    assert grade(row("19"), "12 + 7 = 18") == 0.0
    with pytest.raises(ValueError, match="no 'answer'"):
        grade(row(None), "19")
    with pytest.raises(ValueError, match="unknown grader"):
        build_grader("fuzzy")


@pytest.mark.parametrize("gold, completion, correct", [
    ("\\frac{1}{2}", "The answer is $\\boxed{0.5}$", True),
    ("0.5", "so we get $\\frac{1}{2}$", True),
    ("\\{1, 2\\}", "$\\boxed{\\{2, 1\\}}$", True),
    ("(0, 1]", "$\\boxed{(0,1]}$", True),
    ("10\\%", "$\\boxed{10\\%}$", True),
    ("3", "$x = 3$", True),
    ("3", "$\\boxed{4}$", False),
    ("(0, 1]", "$\\boxed{[0,1]}$", False),
])
def test_math_equivalences(gold, completion, correct):
    assert grade_math_answer(gold, completion) is correct


def test_math_grader_on_rows():
    grade = build_grader("math")
    assert grade(row("19"), "adding gives \\boxed{19}") == 1.0
    assert grade(row("19"), "adding gives \\boxed{20}") == 0.0


def test_code_extraction_and_grading():
    chat = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds."
    assert extract_code(chat).strip().startswith("def add")
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"
    grade = build_grader("code")
    assert grade(row(tests=["assert add(1, 2) == 3", "assert add(0, 0) == 0"]), chat) == 1.0
    assert grade(row(tests="assert add(1, 2) == 4"), chat) == 0.0
    assert grade(row(tests=["assert add(1, 2) == 3"]), "def add(a, b):\n    return a * b") == 0.0
    with pytest.raises(ValueError, match="no 'tests'"):
        grade(row(tests=None), chat)


def test_math_grading_from_many_threads():
    """Graders run in thread pools: concurrent calls must neither race on the worker pool nor time out."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: grade_math_answer(str(i), f"so \\boxed{{{i}}}"), range(48)))
    assert all(results)


def _grade_in_worker(answer: str) -> bool:
    return grade_math_answer("12", answer)


def test_a_process_pool_worker_that_graded_math_exits():
    # The math verifier is a child process of whichever process grades; a pool worker exits by joining its
    # children, which once waited forever on the idle verifier (the lab's pool hung at its end).
    import concurrent.futures
    import multiprocessing
    import threading

    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    assert pool.submit(_grade_in_worker, "so the answer is \\boxed{12}").result(timeout=60) is True
    workers = list(pool._processes.values())
    closing = threading.Thread(target=pool.shutdown, daemon=True)  # shutdown waits for the worker's exit
    closing.start()
    closing.join(timeout=30)
    hung = closing.is_alive()
    if hung:
        for worker in workers:
            worker.kill()
    assert not hung, "the pool worker did not exit after grading math"


# ------------------------------------------------------------------ graders are total
# The helpers below replace the verifier in the *spawned* worker: the pool pickles the function by name, so
# they live at this module's top level and call the real verifier (unpatched in the worker) for other input.

def _dies_on_poison(gold: str, completion: str) -> bool:
    if completion == "poison":
        import os

        os._exit(1)  # what a segfault or the OOM killer looks like from the pool
    from opd.grading.graders import _verify_in_worker

    return _verify_in_worker(gold, completion)


def _hangs_on_slow(gold: str, completion: str) -> bool:
    if completion == "slow":
        import time

        time.sleep(120)
    from opd.grading.graders import _verify_in_worker

    return _verify_in_worker(gold, completion)


def _math_worker_processes():
    from opd.grading import graders

    pool = graders._MATH_WORKER._pool if hasattr(graders, "_MATH_WORKER") else graders._MATH_POOL
    return list(pool._processes.values())


def test_a_math_worker_that_dies_on_an_input_is_replaced_and_the_input_counted_wrong(monkeypatch):
    from opd.grading import graders

    assert grade_math_answer("12", "so \\boxed{12}")  # a worker is running
    monkeypatch.setattr(graders, "_verify_in_worker", _dies_on_poison)
    before = graders.grader_failures().get("worker died", 0) if hasattr(graders, "grader_failures") else 0
    assert grade_math_answer("12", "poison") is False  # dies, is replaced, dies again: wrong, not a crash
    assert graders.grader_failures()["worker died"] == before + 1
    verdict = graders.check_math_answer("12", "poison")
    assert not verdict.correct and verdict.failure == "worker died"
    assert grade_math_answer("12", "so \\boxed{12}")  # later grades still work
    assert not grade_math_answer("12", "so \\boxed{13}")


def test_a_math_worker_killed_between_grades_is_replaced():
    import os
    import signal

    assert grade_math_answer("7", "so \\boxed{7}")
    for process in _math_worker_processes():
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=10)
    assert grade_math_answer("7", "so \\boxed{7}")  # retried in a fresh worker: right, and no failure
    assert grade_math_answer("8", "so \\boxed{8}")


def test_a_math_grade_that_times_out_is_wrong_counted_and_logged(monkeypatch, caplog):
    import time

    from opd.grading import graders

    assert grade_math_answer("12", "so \\boxed{12}")
    monkeypatch.setattr(graders, "_verify_in_worker", _hangs_on_slow)
    monkeypatch.setattr(graders._MATH_WORKER, "timeout_seconds", 5.0)
    before = graders.grader_failures().get("timeout", 0)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="opd.grading"):
        verdict = graders.check_math_answer("12", "slow")
    assert time.monotonic() - started < 30
    assert not verdict.correct and verdict.failure == "timeout" and "5 s limit" in verdict.detail
    assert graders.grader_failures()["timeout"] == before + 1
    assert "grader timeout" in caplog.text and "counts as wrong" in caplog.text
    monkeypatch.undo()
    assert grade_math_answer("12", "so \\boxed{12}")  # the stuck worker was killed; a fresh one grades


# Inputs on which the extraction patterns once backtracked for tens of seconds (their cost grew with the
# square of the length): each must now take well under a second. A bound of 2 s is generous; the old
# patterns took 5-60 s on these.
PATHOLOGICAL = {
    "answer then 32k spaces": "answer" + " " * 32_000 + "x y",
    "32k blank lines": "\n" * 32_000 + "x",
    "5k answers glued": "answer" * 5_500 + "!",
    "1 MB then an answer": " " * 1_000_000 + "\nThe answer is B",
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_answer_extraction_is_linear_on_pathological_completions(name):
    import time

    from opd.evaluate.grading import mc_letter

    text = PATHOLOGICAL[name]
    started = time.perf_counter()
    final_answer(text)
    mc_letter(text)
    build_grader("exact")(row("1"), text)
    assert time.perf_counter() - started < 2.0, name


def test_answer_extraction_reads_the_end_of_a_long_completion():
    from opd.evaluate.grading import mc_letter
    from opd.grading.graders import ANSWER_WINDOW

    filler = "so we reason at length. " * (2 * ANSWER_WINDOW // 24)
    assert mc_letter("The answer is (C).\n" + filler) is None  # stated too early: outside the window
    assert mc_letter(filler + "The answer is (C).") == "C"
    assert final_answer(filler + "\nanswer: 42" + "\n" * 50_000) == "42"


# The patterns as they were (correct but backtracking): on short strings they define the expected answers.
_OLD_ANSWER = re.compile(r"(?:answer\s*[:=]?|=)\s*(-?[\w./-]+)\s*$", re.IGNORECASE)
_OLD_MC = tuple(re.compile(p, f) for p, f in [
    (r"answer\s*(?:is|:)?\s*\**\(?([A-J])\)?\**(?![A-Za-z])", re.IGNORECASE),
    (r"\\boxed\{\s*\(?([A-J])\)?\s*\}", 0),
    (r"^\s*\**\(?([A-J])(?:[).:]\**(?:\s|$)|\**\s*$)", re.MULTILINE),
    (r"\(([A-J])\)", 0),
])


def _old_final_answer(completion: str) -> str:
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    match = _OLD_ANSWER.search(lines[-1])
    return (match.group(1) if match else lines[-1]).strip().rstrip(".")


def _old_mc_letter(completion: str):
    for pattern in _OLD_MC:
        found = pattern.findall(completion)
        if found:
            return found[-1].upper()
    return None


def test_linear_extraction_agrees_with_the_old_patterns_on_short_text():
    import random

    from opd.evaluate.grading import mc_letter

    pieces = ["answer", "Answer", " ", "  ", "\t", "\n", "\n\n", ":", "=", "is", "x", "42", "-3.5", ".", "/",
              "A", "B", "c", "(", ")", "*", "**", "\\boxed{", "}", "!", "I", "the "]
    generator = random.Random(0)
    for _ in range(20_000):
        text = "".join(generator.choice(pieces) for _ in range(generator.randint(0, 12)))
        assert final_answer(text) == _old_final_answer(text), repr(text)
        assert mc_letter(text) == _old_mc_letter(text), repr(text)


def test_grades_that_could_not_be_computed_are_a_metric_of_the_step():
    """A grader failure (timeout, dead worker) counts as reward 0 and shows in reward/grading_failures."""
    import torch

    from opd.collect import grade as grade_batch
    from opd.grading import graders
    from opd.metrics import accuracy_metrics
    from opd.types import RolloutBatch

    class Tokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(int(i)) for i in ids)

    def flaky(row, completion):  # fails on every response that starts with token 7
        if completion.startswith("7"):
            graders._record_failure("timeout", "a stuck grade in the test")
            return 0.0
        return 1.0

    n, width = 4, 3
    batch = RolloutBatch(
        prompt_ids=torch.zeros(n, 2, dtype=torch.long), prompt_mask=torch.ones(n, 2, dtype=torch.bool),
        response_ids=torch.tensor([[7, 1, 1], [2, 1, 1], [7, 3, 1], [4, 1, 1]]),
        response_mask=torch.ones(n, width, dtype=torch.bool), from_teacher=torch.zeros(n, width, dtype=torch.bool),
        sampler_logprobs=torch.zeros(n, width), truncated=torch.zeros(n, dtype=torch.bool),
        domain=("math", "math", "code", "code"), prompt_index=(0, 0, 1, 1))
    graded = grade_batch(batch, {"math": flaky, "code": flaky}, [row("1"), row("1")], Tokenizer(), group_size=2)
    assert graded.rewards.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert graded.grading_failed.tolist() == [True, False, True, False]
    metrics = accuracy_metrics(graded)
    assert metrics["reward/grading_failures"].value == 2.0
    assert metrics["reward/math/grading_failures"].value == metrics["reward/code/grading_failures"].value == 1.0


def _backtracks(window: str) -> str:
    """An extractor that regressed to exponential backtracking on a pathological completion."""
    if window.endswith("(((((((((("):
        re.fullmatch(r"(\(+)+x", window[-30:])  # 2**30 ways to split the run of brackets: minutes
    return window


def test_exact_and_multiple_choice_grades_have_a_literal_timeout(monkeypatch, caplog):
    """Extraction is linear by design; if it ever is not, the grade fails at ANSWER_TIMEOUT_SECONDS instead
    of hanging the run, and the failure is counted."""
    from opd.evaluate.grading import grade
    from opd.evaluate.problem import Problem
    from opd.grading import graders

    pathological = "reasoning " + "(" * 40
    question = Problem(benchmark="mmlu_stem", problem_id="q", domain="stem", prompt="Pick one.", answer="C")
    assert graders.exact_grader(row("19"), "so the answer: 19") == 1.0
    assert grade(question, "The answer is (C).").correct
    monkeypatch.setattr(graders, "final_answer", _backtracks)
    monkeypatch.setattr("opd.evaluate.grading.mc_letter", _backtracks)
    monkeypatch.setattr(graders.ANSWER_WORKER, "timeout_seconds", 2.0)
    before = graders.grader_failures().get("timeout", 0)
    with caplog.at_level("WARNING", logger="opd.grading"):
        assert graders.exact_grader(row("19"), pathological) == 0.0
        chosen = grade(question, pathological)
    assert not chosen.correct and chosen.failure == "timeout" and "2 s limit" in chosen.reason
    assert graders.grader_failures()["timeout"] == before + 2
    assert "answer extraction took more than its 2 s limit" in caplog.text
    monkeypatch.undo()
    assert graders.exact_grader(row("19"), "so the answer: 19") == 1.0  # a fresh worker after the kill
