"""Loading models and tokenizers from local Hugging Face folders, and rendering prompts to token ids.

Everything loads with `local_files_only=True`: opd never reaches a model hub at run time, and a path
that is not a local folder is an error that says so (rather than a slow network timeout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from opd.runtime.lora import causal_lm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Messages = list[dict[str, str]]


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and advice: opd draws its own progress."""
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def check_model_folder(path: str, key: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{key}: '{path}' is not a local folder. opd loads Hugging Face checkpoints from local folders only "
            "(download one first, e.g. `hf download ORG/NAME --local-dir DIR`)."
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{key}: '{path}' has no config.json; is it a save_pretrained folder?")
    return folder


def load_model(path: str, dtype: str = "float32", *, key: str = "model", trainable: bool = False) -> nn.Module:
    """A causal LM from a local folder; frozen and in eval mode unless trainable."""
    check_model_folder(path, key)
    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    # Dropout would make the training forward differ from the policy that sampled: OPD assumes they match.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def load_tokenizer(path: str, *, key: str = "model", chat_template: str | None = None):
    check_model_folder(path, key)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if chat_template is not None:
        template_path = Path(chat_template)
        tokenizer.chat_template = template_path.read_text() if template_path.is_file() else chat_template
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{key}: tokenizer at '{path}' has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def render_prompt(tokenizer, prompt: str | Messages, prompt_format: str) -> list[int]:
    """Token ids of a prompt, ready for the response to follow.

    chat: text becomes one user message; messages are rendered with the tokenizer's chat template and the
    generation prompt. raw: text is tokenized as is (with the tokenizer's own special tokens, e.g. BOS).
    """
    if prompt_format == "raw":
        if not isinstance(prompt, str):
            raise ValueError("data.prompt_format=raw needs text prompts, got chat messages")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; set data.prompt_format=raw to tokenize prompts as plain text"
        )
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already wrote every special token it wants (BOS included): add none twice.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_sequence_ids(model: nn.Module, tokenizer) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation_config list."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, Sequence):
        ids.update(int(i) for i in configured)
    if not ids:
        raise ValueError("the student has no end-of-sequence token (tokenizer.eos_token_id and generation_config)")
    return tuple(sorted(ids))


def output_width(model: nn.Module) -> int:
    return int(causal_lm(model).get_output_embeddings().weight.shape[0])
