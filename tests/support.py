"""Helpers several test files share (fixtures live in conftest.py); test files never import each other."""

from __future__ import annotations

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
