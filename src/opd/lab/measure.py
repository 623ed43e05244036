"""Measuring a model on a domain's held-out problems: accuracy at a temperature, response length, entropy.

Sampling goes through `opd.rollout` (the same sampler training uses, with its own generation settings,
never a checkpoint's), grading through `opd.grading.graders` (math-verify for sums, the sandbox for programs).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import torch

from opd.data import PromptRow
from opd.grading.graders import code_grader, math_grader
from opd.lab.tasks import Problem
from opd.runtime.models import load_model, load_tokenizer, render_prompt
from opd.rollout.batch import SamplingSettings
from opd.rollout.hf import sample_in_batches

GRADERS = {"sums": math_grader, "programs": code_grader}


@dataclass(frozen=True, kw_only=True, slots=True)
class Measurement:
    accuracy: float  # mean reward over problems x samples
    length: float  # mean response tokens (end token included)
    entropy: float  # mean per-token entropy of the sampling distribution
    count: int  # graded responses


def _grade(domain: str, prompt: str, answer: str, tests: str, completion: str) -> float:
    row = PromptRow(index=0, prompt=prompt, domain=domain, answer=answer, tests=tests or None)
    if domain == "sums":  # graded blind to the surface style: the mismatched student writes `# 2 1` for `#21`
        completion = completion.replace(" ", "")
    return GRADERS[domain](row, completion)


def _key(problem: Problem, completion: str) -> tuple[str, str, str, str, str]:
    return (problem.domain, problem.prompt, problem.answer, problem.tests, completion)


class GradeStore:
    """Grades of held-out answers, shared by the lab's worker processes and kept for its later jobs (sqlite
    in the lab folder). The graders are functions of the problem and the text, and every job answers the same
    held-out problems: the lab's models write the same programs again and again, and a sandbox run (~70 ms)
    was most of a measurement's time."""

    def __init__(self, path: Path):
        self.connection = sqlite3.connect(path, timeout=120)
        with self.connection:
            self.connection.execute("CREATE TABLE IF NOT EXISTS grades (domain TEXT, prompt TEXT, answer TEXT, "
                                    "tests TEXT, completion TEXT, grade REAL, PRIMARY KEY (domain, prompt, "
                                    "answer, tests, completion))")

    def __enter__(self) -> "GradeStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        # A lab worker runs many jobs in one process: each job's connection is closed when the job ends, not
        # whenever the garbage collector gets to it.
        self.connection.close()

    def get(self, key: tuple) -> float | None:
        row = self.connection.execute("SELECT grade FROM grades WHERE domain = ? AND prompt = ? AND answer = ? "
                                      "AND tests = ? AND completion = ?", key).fetchone()
        return None if row is None else row[0]

    def put(self, graded: dict[tuple, float]) -> None:
        with self.connection:
            self.connection.executemany("INSERT OR IGNORE INTO grades VALUES (?, ?, ?, ?, ?, ?)",
                                        [(*key, grade) for key, grade in graded.items()])


def grade_distinct(answered: list[tuple[Problem, str]], store: GradeStore | None = None) -> dict[tuple, float]:
    """The grade of every distinct (problem, completion), each graded once: a low-entropy model writes the
    same answer to a problem many times over. With a store, answers graded by an earlier job are reused."""
    grades: dict[tuple, float] = {}
    new: dict[tuple, float] = {}
    for problem, completion in answered:
        key = _key(problem, completion)
        if key in grades:
            continue
        known = store.get(key) if store is not None else None
        if known is None:
            known = new[key] = _grade(problem.domain, problem.prompt, problem.answer, problem.tests, completion)
        grades[key] = known
    if store is not None and new:
        store.put(new)
    return grades


@torch.no_grad()
def measure(folder: str, problems: list[Problem], *, temperature: float = 1.0, samples: int = 1, seed: int = 0,
            max_new_tokens: int = 48, store: GradeStore | None = None) -> Measurement:
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    settings = SamplingSettings(samples_per_prompt=samples, temperature=temperature, top_p=1.0,
                                max_new_tokens=max_new_tokens, batch_size=128,
                                end_of_sequence_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id)
    prompts = [render_prompt(tokenizer, p.prompt, "chat") for p in problems for _ in range(samples)]
    # Shared noise (rollout/hf.py): every model measured at this seed draws row r's tokens with the same
    # noise, so the sampling noise mostly cancels in the paired differences the verdicts rest on. It draws
    # nothing from torch's generator, so a measurement neither needs nor moves the global seed.
    responses = sample_in_batches(model, prompts, settings, shared_noise_seed=seed)
    completions = [tokenizer.decode(responses.ids[row][responses.mask[row]], skip_special_tokens=True)
                   for row in range(len(prompts))]
    answered = list(zip((p for p in problems for _ in range(samples)), completions))
    grades = grade_distinct(answered, store)
    rewards = [grades[_key(problem, completion)] for problem, completion in answered]
    tokens = responses.mask.sum().item()
    return Measurement(accuracy=sum(rewards) / len(rewards), length=tokens / len(rewards),
                       entropy=(responses.entropy * responses.mask).sum().item() / max(tokens, 1), count=len(rewards))
