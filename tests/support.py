"""Helpers several test files share (fixtures live in conftest.py); test files never import each other."""

from __future__ import annotations

import math

from transformers import AutoModelForCausalLM


def parameters_of(folder):
    """Every parameter of the HF model saved at `folder`, by name (detached copies)."""
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def argmax_decode(model, prompt: list[int], max_new_tokens: int, end_ids) -> list[int]:
    """Greedy decoding by hand: the argmax of one full forward per token (no cache, no generate), up to and
    including the first end id."""
    import torch

    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1]
            tokens.append(int(logits.argmax()))
            if tokens[-1] in end_ids:
                break
    return tokens


def two_proportion_z(correct_a: int, correct_b: int, total: int) -> float:
    """z of the difference of two proportions of `total` trials each, under the pooled null p_a = p_b."""
    pooled = (correct_a + correct_b) / (2 * total)
    spread = math.sqrt(2 * pooled * (1 - pooled) / total)
    return (correct_a - correct_b) / total / spread


def holds_a_vowel(pairs, on_grade=None):
    """A stand-in grader with a rate well inside (0, 1) on a tiny random model (it answers no benchmark
    question, so the real grader's 0 = 0 would prove nothing): 'correct' when the sample holds a vowel.
    Stands in for `opd.evaluate.run.grade_all`."""
    from opd.evaluate.problem import Grade

    grades = [Grade(correct=any(v in completion for v in "aeiou"), reason="a vowel") for _, completion in pairs]
    for graded in grades:
        if on_grade is not None:
            on_grade(graded)
    return grades
