"""Tiny real Hugging Face models and tokenizers, built from scratch on the CPU.

Tests, the demo and the lab build their models here and save them as ordinary `save_pretrained`
folders, so they load back through exactly the code path a user's 4B checkpoint takes. Nothing is
downloaded: the tokenizer is a byte-level BPE trained by the `tokenizers` library on a corpus we pass in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast, Qwen3Config,
                          Qwen3ForCausalLM)

from opd.runtime.models import quiet_transformers

SPECIAL_TOKENS = ("<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DEFAULT_CORPUS = (
    "the quick brown fox jumps over the lazy dog",
    "question: what is 12 + 7? answer: 19",
    "count the letters in hello world and repeat them back",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) . , ? !",
)


def build_tokenizer(folder: str | Path, corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 300,
                    individual_digits: bool = False):
    """Train a byte-level BPE tokenizer with chat special tokens and save it to `folder`.

    individual_digits: every digit is its own token (no merges across digits), which small arithmetic
    models need to learn carries.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if individual_digits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|end|>", chat_template=CHAT_TEMPLATE
    )
    wrapped.save_pretrained(str(folder))
    return wrapped


def build_model(
    folder: str | Path,
    tokenizer,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
    vocab_size: int | None = None,
    initializer_range: float = 0.02,  # larger: peakier distributions (log-prob comparisons that mean something)
):
    """A randomly initialised Qwen3-style causal LM saved (with the tokenizer) as an HF folder."""
    quiet_transformers()
    config = Qwen3Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        head_dim=hidden_size // num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=initializer_range,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return model


def sft_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token training tensors for (prompt ids, response ids) pairs, right-padded to the longest.

    Returns input_ids [B, L], attention_mask [B, L] (1 on real tokens) and labels [B, L]: the response ids,
    -100 on the prompt and the padding, so the loss counts response tokens only.
    """
    sequences = [prompt + response for prompt, response in examples]
    labels = [[-100] * len(prompt) + response for prompt, response in examples]
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    targets = torch.tensor([t + [-100] * (width - len(t)) for t in labels])
    return ids, mask, targets


def perturb_model(source: str | Path, folder: str | Path, *, scale: float = 0.5, seed: int = 1):
    """A copy of the model at `source` with Gaussian noise added to every weight (a different teacher)."""
    model = AutoModelForCausalLM.from_pretrained(str(source), local_files_only=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * parameter.std().nan_to_num(1.0) * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(source), local_files_only=True).save_pretrained(str(folder))
    return model
