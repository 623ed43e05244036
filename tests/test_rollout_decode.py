"""The HF sampler's decode loop (rollout/decode.py) against Hugging Face `generate`: the same tokens, log-probs
and entropies bit for bit, torch's generator left where generate leaves it, while the rows that ended are
dropped from the forward batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from opd.rollout import decode as decode_module
from opd.rollout.batch import SamplingSettings, left_pad
from opd.rollout.hf import generate_responses, shared_uniforms
from opd.runtime.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def student(model_dir):
    return load_model(str(model_dir / "student")), load_tokenizer(str(model_dir / "student"))


def rows(tokenizer, equal_lengths: bool) -> list[list[int]]:
    """12 prompt rows; of different lengths (left padding, the 2D mask path) unless `equal_lengths` (no
    padding: generate drops the mask)."""
    texts = [f"question {i}: what is {i * 7} + {i}?" + " more" * (0 if equal_lengths else i % 4) for i in range(12)]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = min(len(e) for e in encoded)
    return [e[:width] for e in encoded] if equal_lengths else encoded


class _Record(LogitsProcessor):
    """The reference's last processor: keeps each step's scores (what the token is drawn from) and, for shared
    noise, adds it as the old sampler did (generate then takes the argmax)."""

    def __init__(self, noise_seed: int | None, prompt_width: int):
        self.steps, self.noise_seed, self.prompt_width = [], noise_seed, prompt_width

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        if self.noise_seed is None:
            return scores
        position = input_ids.shape[1] - self.prompt_width
        uniforms = shared_uniforms(self.noise_seed, torch.arange(scores.shape[0]), position, scores.shape[1])
        return scores - torch.log(-torch.log(uniforms))


def reference(model, prompts, settings: SamplingSettings, noise_seed: int | None):
    """generate's tokens [N, S] (pad after the end), and the log-prob and entropy of each drawn token's
    distribution, computed from the scores generate drew it from."""
    ids, mask = left_pad(prompts, settings.pad_id)
    greedy = settings.temperature == 0
    sample = not greedy and noise_seed is None
    record = _Record(None if greedy else noise_seed, ids.shape[1])
    # The warpers go in the list ahead of the recorder (generate would put its own after ours); at 1.0 in the
    # config generate adds none of its own.
    config = GenerationConfig(do_sample=sample, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=settings.max_new_tokens,
                              eos_token_id=list(settings.end_of_sequence_ids), pad_token_id=settings.pad_id)
    processors = [] if greedy else [TemperatureLogitsWarper(settings.temperature)]
    if settings.top_p < 1.0 and not greedy:
        processors.append(TopPLogitsWarper(settings.top_p))
    with torch.inference_mode():
        sequences = model.generate(input_ids=ids, attention_mask=mask.long(), generation_config=config,
                                   logits_processor=LogitsProcessorList([*processors, record]))
    tokens = sequences[:, ids.shape[1]:]
    logprobs = torch.stack([torch.log_softmax(s, -1) for s in record.steps], dim=1)  # [N, S, V]
    entropy = -(logprobs.exp() * logprobs.nan_to_num(neginf=0.0)).sum(-1)
    return tokens, logprobs.gather(2, tokens[:, :, None]).squeeze(2), entropy


CASES = {
    "sampled, padded prompts": dict(temperature=0.7, top_p=1.0, noise=None, equal=False),
    "sampled with top-p, prompts without padding": dict(temperature=1.0, top_p=0.8, noise=None, equal=True),
    "shared noise": dict(temperature=0.9, top_p=1.0, noise=5, equal=False),
    "greedy": dict(temperature=0.0, top_p=1.0, noise=None, equal=False),
}


@pytest.mark.parametrize("case", CASES)
def test_the_loop_samples_what_generate_samples_bit_for_bit(student, case, monkeypatch):
    """Rows end at different steps (a seventh of the vocabulary ends a row), so the batch shrinks; every
    token, log-prob and entropy is generate's, and torch's generator is left where generate leaves it."""
    model, tokenizer = student
    spec = CASES[case]
    prompts = rows(tokenizer, spec["equal"])
    settings = SamplingSettings(samples_per_prompt=1, temperature=spec["temperature"], top_p=spec["top_p"],
                                max_new_tokens=24, batch_size=12, pad_id=tokenizer.pad_token_id,
                                end_of_sequence_ids=tuple(range(0, model.config.vocab_size, 7)))
    batch_sizes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    torch.manual_seed(11)
    responses = generate_responses(model, prompts, settings,
                                   shared_noise=None if spec["noise"] is None else (spec["noise"], 0))
    after_loop = torch.rand(4)
    model._forward_pre_hooks.clear()
    torch.manual_seed(11)
    tokens, logprobs, entropy = reference(model, prompts, settings, spec["noise"])
    after_generate = torch.rand(4)

    mask = responses.mask
    assert responses.ids.shape == tokens.shape  # the same number of steps
    assert torch.equal(responses.ids[mask], tokens[mask])
    assert torch.equal(responses.logprobs[mask], logprobs[mask])
    assert torch.equal(responses.entropy[mask], entropy[mask])
    assert torch.equal(after_loop, after_generate)
    lengths = mask.sum(1)
    assert lengths.min() < lengths.max()  # rows did end at different steps
    assert min(batch_sizes) < len(prompts)  # ...and the ended rows left the forward batch
    assert min(batch_sizes) >= decode_module._FEWEST_ROWS


def test_a_cache_that_cannot_be_cut_by_row_keeps_every_row(student, monkeypatch):
    """A model whose cache layers are not plain key/value tensors keeps the whole batch (the same tokens)."""
    model, tokenizer = student
    monkeypatch.setattr(decode_module, "_ROW_CUT_LAYERS", frozenset())
    settings = SamplingSettings(samples_per_prompt=1, temperature=1.0, top_p=1.0, max_new_tokens=16, batch_size=12,
                                pad_id=tokenizer.pad_token_id,
                                end_of_sequence_ids=tuple(range(0, model.config.vocab_size, 7)))
    batch_sizes = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    torch.manual_seed(3)
    kept = generate_responses(model, rows(tokenizer, False), settings)
    handle.remove()
    monkeypatch.undo()
    torch.manual_seed(3)
    dropped = generate_responses(model, rows(tokenizer, False), settings)
    assert set(batch_sizes) == {12}
    assert all(torch.equal(getattr(kept, f.name), getattr(dropped, f.name)) for f in dataclasses.fields(kept))
