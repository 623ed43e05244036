"""Student rollouts with Hugging Face `generate`, recording the sampler's log-prob of every token.

Two traps this module avoids:
- A checkpoint's own `generation_config.json` (Qwen3 ships temperature 0.6, top_k 20, top_p 0.95)
  would silently override our sampling settings; we build the generation config from scratch.
- `output_scores=True` keeps [steps, N, V] logits (gigabytes at 151k vocab); instead a logits processor
  placed after our temperature / top-p warpers keeps only the previous step's log-probs [N, V] and
  gathers the sampled token's log-prob when the next step arrives.

The recorded lOld is the log-prob under the distribution the token was actually drawn from (after
temperature and top-p), which is what importance sampling needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from opd.types import RolloutBatch


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingSettings:
    samples_per_prompt: int
    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int  # rows (prompt x sample) per generate call
    end_of_sequence_ids: tuple[int, ...]
    pad_id: int


class _SampledLogprobRecorder:
    """Logits processor that records log pi_sampler(token) for each generated token."""

    def __init__(self) -> None:
        self.previous: Tensor | None = None  # [N, V] log-probs of the last step
        self.recorded: list[Tensor] = []  # per step: [N]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:
            self.recorded.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: Tensor) -> Tensor:  # [N, steps]
        if self.previous is not None:
            self.recorded.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
            self.previous = None
        return torch.stack(self.recorded, dim=1)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """[N, P] ids and bool mask, padded on the left (generation continues from the right edge)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            mask[row, width - len(sequence) :] = True
    return ids, mask


@torch.no_grad()
def generate_responses(
    model: nn.Module, prompts: list[list[int]], settings: SamplingSettings
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sample one response per prompt row: ids [N, T], mask [N, T], sampler log-probs [N, T], truncated [N]."""
    from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    prompt_ids, prompt_mask = left_pad(prompts, settings.pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(model.device), prompt_mask.to(model.device)
    recorder = _SampledLogprobRecorder()
    processors = [TemperatureLogitsWarper(settings.temperature)]
    if settings.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=settings.top_p))
    processors.append(recorder)
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,  # ours are in `processors`, ahead of the recorder
        top_p=1.0,
        top_k=0,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=list(settings.end_of_sequence_ids),
        pad_token_id=settings.pad_id,
    )
    was_training = model.training
    model.eval()
    try:
        sequences = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask.long(),
            generation_config=generation_config,
            logits_processor=LogitsProcessorList(processors),
        )
    finally:
        model.train(was_training)
    response_ids = sequences[:, prompt_ids.shape[1] :]
    sampler_logprobs = recorder.finish(response_ids[:, -1])
    response_mask, truncated = response_mask_until_end(response_ids, settings.end_of_sequence_ids)
    response_ids = response_ids.masked_fill(~response_mask, settings.pad_id)
    sampler_logprobs = sampler_logprobs.masked_fill(~response_mask, 0.0)
    return response_ids, response_mask, sampler_logprobs, truncated


def response_mask_until_end(response_ids: Tensor, end_ids: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """True up to and including the first end-of-sequence token; truncated rows have none."""
    is_end = torch.isin(response_ids, torch.tensor(end_ids, device=response_ids.device))
    ends_before = is_end.long().cumsum(dim=1) - is_end.long()  # end tokens strictly before each position
    mask = ends_before == 0
    truncated = ~is_end.any(dim=1)
    return mask, truncated


def rollout(
    model: nn.Module,
    prompt_token_ids: list[list[int]],  # one entry per prompt
    prompt_indices: list[int],  # dataset row of each prompt
    domains: list[str],
    settings: SamplingSettings,
) -> RolloutBatch:
    """`samples_per_prompt` responses per prompt, generated `batch_size` rows at a time."""
    rows = [
        (ids, index, domain)
        for ids, index, domain in zip(prompt_token_ids, prompt_indices, domains, strict=True)
        for _ in range(settings.samples_per_prompt)
    ]
    pieces = []
    for start in range(0, len(rows), settings.batch_size):
        chunk = rows[start : start + settings.batch_size]
        pieces.append(generate_responses(model, [ids for ids, _, _ in chunk], settings))
    prompt_ids, prompt_mask = left_pad([ids for ids, _, _ in rows], settings.pad_id)
    response_ids = _cat_right_padded([p[0] for p in pieces], settings.pad_id)
    response_mask = _cat_right_padded([p[1] for p in pieces], False)
    sampler_logprobs = _cat_right_padded([p[2] for p in pieces], 0.0)
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        from_teacher=torch.zeros_like(response_mask),
        sampler_logprobs=sampler_logprobs,
        truncated=torch.cat([p[3] for p in pieces]).cpu(),
        domain=tuple(domain for _, _, domain in rows),
        prompt_index=tuple(index for _, index, _ in rows),
    )


def _cat_right_padded(parts: list[Tensor], fill) -> Tensor:
    width = max(part.shape[1] for part in parts)
    padded = [torch.nn.functional.pad(p.cpu(), (0, width - p.shape[1]), value=fill) for p in parts]
    return torch.cat(padded, dim=0)
