"""Which `Sampler` draws an evaluation's samples: `opd eval --backend hf | vllm` or `--server URL`, chosen
once here.

Evaluation samples through the same `Sampler` protocol as training (rollout/batch.py), so every sampler
training has plugs in: Hugging Face `generate` on the model (`hf`), a vLLM engine in this process
(`vllm`), or a vLLM server serving the folder (`server`, `opd eval MODEL --server URL`). A new one is one
entry in `EVAL_SAMPLERS` and, when it needs more than the model folder, a field in `EvalBackend`.

Whatever the backend, the samples are drawn from the same distribution (temperature and top-p applied
the same way; tests/evaluate/test_eval_vllm.py checks the log-probs to 1e-3 and avg@k to binomial noise),
but not the same draws: the cache key holds the backend's name, so a cached file always comes from one
sampler and an evaluation can be reproduced from its cache.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

from transformers import AutoConfig, GenerationConfig

from opd.evaluate.problem import Problem
from opd.rollout.batch import Sampler
from opd.rollout.hf import HfSampler
from opd.rollout.vllm import EngineSettings, VllmEngine
from opd.runtime.models import end_of_sequence_ids, load_model, load_tokenizer, render_prompt
from opd.served.checks import ServedExpectation, check_served_model
from opd.served.client import RetrySettings
from opd.served.engine import ServedModel, ServedSettings


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalBackend:
    """The sampler of an evaluation and what it needs beyond the model folder; only `name` changes results."""

    name: str = "hf"  # a key of EVAL_SAMPLERS
    dtype: str = "float32"  # the model's dtype while sampling
    kv_cache_gib: float = 1.0  # vllm: the engine's KV cache (explicit: vLLM's default fails on the CPU)
    max_model_len: int | None = None  # vllm: tokens per sequence; None = the model's max_position_embeddings
    seed: int = 0  # vllm: its sampling stream (HF draws from torch's global generator)
    server: str | None = None  # server: the URL of a vLLM server serving the model folder (`opd serve MODEL`)

    def __post_init__(self) -> None:
        if self.name not in EVAL_SAMPLERS:
            raise ValueError(f"opd eval --backend {self.name}: unknown backend; choose one of {sorted(EVAL_SAMPLERS)}")
        if not self.kv_cache_gib > 0:
            raise ValueError(f"opd eval --kv-cache-gib {self.kv_cache_gib}: must be > 0")
        if (self.name == "server") != (self.server is not None):
            raise ValueError("eval: --server URL samples from a vLLM server serving MODEL (and only it does)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"opd eval --max-model-len {self.max_model_len}: must be at least 2 tokens")


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalSampler:
    """A sampler over one model folder, with what turning problems into prompts and samples into text needs."""

    sampler: Sampler
    tokenizer: object  # the model folder's tokenizer (decoding completions)
    end_of_sequence_ids: tuple[int, ...]
    prompts: dict[str, list[int]]  # problem_id -> rendered prompt ids


def _rendered(tokenizer, problems: list[Problem], template_kwargs: dict) -> dict[str, list[int]]:
    prompt_format = "chat" if getattr(tokenizer, "chat_template", None) else "raw"
    return {p.problem_id: render_prompt(tokenizer, p.prompt, prompt_format, template_kwargs) for p in problems}


def _hf(model_dir: str, backend: EvalBackend, tokenizer, prompts: dict[str, list[int]], max_new_tokens: int) -> Sampler:
    return HfSampler(load_model(model_dir, backend.dtype, key="MODEL_DIR"))


def _vllm(model_dir: str, backend: EvalBackend, tokenizer, prompts: dict[str, list[int]], max_new_tokens: int) -> Sampler:
    length = backend.max_model_len or AutoConfig.from_pretrained(model_dir, local_files_only=True).max_position_embeddings
    longest = max(prompts.items(), key=lambda item: len(item[1]))
    # vLLM refuses a request longer than its engine mid-run; refuse it here, before the engine is built.
    if len(longest[1]) + max_new_tokens > length:
        raise ValueError(f"opd eval --backend vllm: problem {longest[0]!r} has a {len(longest[1])}-token prompt; "
                         f"with --max-new-tokens {max_new_tokens} it needs --max-model-len >= "
                         f"{len(longest[1]) + max_new_tokens} (now {length})")
    return VllmEngine(EngineSettings(model_path=model_dir, dtype=backend.dtype,
                                     kv_cache_bytes=int(backend.kv_cache_gib * 2**30), max_model_len=length,
                                     enforce_eager=True, seed=backend.seed, max_logprobs=1))


def _served(model_dir: str, backend: EvalBackend, tokenizer, prompts: dict[str, list[int]],
            max_new_tokens: int) -> Sampler:
    """A server serving `model_dir` itself (its /v1/models root), checked like a training run's servers."""
    settings = ServedSettings(urls=(backend.server,), max_concurrency=8, retry=RetrySettings(), key="--server")
    model = ServedModel(settings)
    root = model.clients[0].models()[0].get("root") or ""
    if Path(root).resolve() != Path(model_dir).resolve():
        raise ValueError(f"opd eval --server {backend.server}: the server serves {root}, not {model_dir}; start it "
                         f"with `opd serve {model_dir}` (results are recorded as the folder's)")
    # Prompts go as our token ids, so the server's chat template plays no part; its tokenizer and context do.
    check_served_model(model.clients[0], ServedExpectation(
        key="--server", tokenizer=tokenizer, width=AutoConfig.from_pretrained(model_dir, local_files_only=True).vocab_size,
        renderings=(), prompt_format="chat", required_length=max(len(ids) for ids in prompts.values()) + max_new_tokens,
        topk=0, reloads=False))
    return model


# The evaluation's sampler, by `opd eval --backend` (`--server URL` is the backend "server"): (model
# folder, backend, tokenizer, every prompt it will be asked for, max new tokens) -> Sampler.
EVAL_SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "hf": _hf,
    "vllm": _vllm,
    "server": _served,
}


@contextlib.contextmanager
def open_eval_sampler(model_dir: str, backend: EvalBackend, problems: list[Problem], max_new_tokens: int,
                      template_kwargs: dict | None = None):
    """The EvalSampler for `problems` (every problem it will sample, its prompt rendered with the chat
    template's `template_kwargs`), closed (an engine freed) on exit."""
    tokenizer = load_tokenizer(model_dir, key="MODEL_DIR")
    prompts = _rendered(tokenizer, problems, template_kwargs or {})
    sampler = EVAL_SAMPLERS[backend.name](model_dir, backend, tokenizer, prompts, max_new_tokens)
    try:
        yield EvalSampler(sampler=sampler, tokenizer=tokenizer,
                          end_of_sequence_ids=_end_ids(model_dir, tokenizer), prompts=prompts)
    finally:
        sampler.close()


def _end_ids(model_dir: str, tokenizer) -> tuple[int, ...]:
    """`end_of_sequence_ids` from the folder's configs alone (what it reads of a model), so that a vLLM
    evaluation never loads the HF weights; the same ids as the loaded model gives."""
    try:
        generation = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except OSError:  # no generation_config.json: the model config's own eos_token_id
        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    return end_of_sequence_ids(SimpleNamespace(generation_config=generation), tokenizer)
