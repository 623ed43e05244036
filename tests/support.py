"""Helpers several test files share (fixtures live in conftest.py); test files never import each other."""

from __future__ import annotations

from transformers import AutoModelForCausalLM


def parameters_of(folder):
    """Every parameter of the HF model saved at `folder`, by name (detached copies)."""
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    return {name: p.detach().clone() for name, p in model.named_parameters()}
