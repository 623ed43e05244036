"""Measuring a model on a domain's held-out problems: accuracy at a temperature, response length, entropy.

Sampling goes through `opd.rollout` (the same sampler training uses, with its own generation settings,
never a checkpoint's), grading through `opd.grading.graders` (math-verify for sums, the sandbox for programs).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@torch.no_grad()
def measure(folder: str, problems: list[Problem], *, temperature: float = 1.0, samples: int = 1, seed: int = 0,
            max_new_tokens: int = 48) -> Measurement:
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    settings = SamplingSettings(samples_per_prompt=samples, temperature=temperature, top_p=1.0,
                                max_new_tokens=max_new_tokens, batch_size=256,
                                end_of_sequence_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id)
    prompts = [render_prompt(tokenizer, p.prompt, "chat") for p in problems for _ in range(samples)]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    responses = sample_in_batches(model, prompts, settings)
    torch.random.set_rng_state(generator_state)
    # A low-entropy model writes the same answer to a problem many times over; the graders are functions of
    # the text, so each distinct (problem, completion) is graded once (the grader's process call, not the
    # sampling, was most of a measurement's time).
    grades: dict[tuple[int, str], float] = {}
    rewards = []
    for row, (index, problem) in enumerate((i, p) for i, p in enumerate(problems) for _ in range(samples)):
        completion = tokenizer.decode(responses.ids[row][responses.mask[row]], skip_special_tokens=True)
        if (index, completion) not in grades:
            grades[index, completion] = _grade(problem.domain, problem.prompt, problem.answer, problem.tests,
                                               completion)
        rewards.append(grades[index, completion])
    tokens = responses.mask.sum().item()
    return Measurement(accuracy=sum(rewards) / len(rewards), length=tokens / len(rewards),
                       entropy=(responses.entropy * responses.mask).sum().item() / max(tokens, 1), count=len(rewards))
