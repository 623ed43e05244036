"""Building the lab's models from nothing: a tokenizer, tiny Qwen3-style decoders, and their pretraining.

Pretraining is a plain next-token loop on demonstrations (users of opd start from a pretrained
checkpoint, so this is the lab's stand-in for one, not an opd feature); everything after it (the RL
teachers, SFT, OPD, ExOPD, TrOPD) goes through `opd.train.train`, the code path users run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from opd.lab.tasks import DOMAINS, Demonstrations, demonstration
from opd.runtime.models import load_model, render_prompt
from opd.runtime.tiny import build_model, build_tokenizer, sft_batch


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int = 4


@dataclass(frozen=True, kw_only=True, slots=True)
class PretrainSettings:
    steps: int
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 30
    domains: tuple[str, ...] = DOMAINS


def build_lab_tokenizer(folder: Path, seed: int = 0):
    """Byte-level BPE with digits kept apart, its merges learned from demonstrations of both domains."""
    rng = random.Random(seed)
    corpus = [" ".join(demonstration(domain, rng, Demonstrations())) for domain in DOMAINS for _ in range(400)]
    return build_tokenizer(folder, corpus=corpus, vocab_size=300, individual_digits=True)


def pretrain(folder: Path, tokenizer_folder: Path, shape: ModelShape, settings: PretrainSettings,
             style: Demonstrations, seed: int, progress=None) -> list[float]:
    """Build a model at `folder` and train it on freshly drawn demonstrations; returns the loss curve."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
    build_model(folder, tokenizer, hidden_size=shape.hidden_size, num_layers=shape.num_layers,
                num_heads=shape.num_heads, seed=seed)
    model = load_model(str(folder), trainable=True)
    model.train()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.98))
    prompt_cache: dict[str, list[int]] = {}
    losses = []
    for step in range(settings.steps):
        lr_scale = min(1.0, (step + 1) / settings.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * max(lr_scale, 0.02)
        examples = []
        for _ in range(settings.batch_size):
            prompt, response = demonstration(rng.choice(settings.domains), rng, style)
            if prompt not in prompt_cache:
                prompt_cache[prompt] = render_prompt(tokenizer, prompt, "chat")
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            examples.append((prompt_cache[prompt], response_ids))
        loss = accumulate_gradients(model, examples, tokenizer.pad_token_id)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        if progress is not None:
            progress(step + 1, settings.steps, loss)
    model.save_pretrained(str(folder))
    return losses


def accumulate_gradients(model, examples: list[tuple[list[int], list[int]]], pad_id: int, buckets: int = 4) -> float:
    """The batch's mean next-token loss over its response tokens, its gradient accumulated in the parameters.

    The batch runs as `buckets` forwards of examples of similar length (sorted), each padded to its own
    longest: one forward padded to the batch's longest spent half its tokens on padding when the mismatched
    style's spaced answers are twice as long. Each bucket's summed token loss is divided by the whole batch's
    token count, so the loss and the gradient are the one-forward batch's (up to rounding).
    """
    tokens = sum(len(response) for _, response in examples)
    ordered = sorted(examples, key=lambda example: len(example[0]) + len(example[1]))
    size = -(-len(ordered) // buckets)
    total = 0.0
    for start in range(0, len(ordered), size):
        ids, mask, targets = sft_batch(ordered[start:start + size], pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=targets, num_items_in_batch=tokens).loss
        loss.backward()
        total += loss.item()
    return total
