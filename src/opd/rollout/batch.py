"""What every sampler shares: the `Sampler` protocol, sampling settings, sampled responses, teacher-prefix
placement, padding, cutting at the end of sequence, and assembling a RolloutBatch.

The samplers themselves live beside this module (hf.py: Hugging Face `generate`; vllm.py: a vLLM engine)
and are chosen once, in assemble.py; nothing else asks which one it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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
    synced: bool = False  # more than one process shares the student (FSDP)
    # A training step's own rollout seed (collect.rollout_seed: train seed, rank, step): the servers' request
    # seeds and the batch's noise are drawn from generators seeded with it, so a step's rollouts depend on no
    # other thread's draws (pipelined.py) and a resumed step draws the same. None: torch's global generator.
    # HF generate and an in-process vLLM engine keep their own streams; of those only an hf teacher writing
    # guidance prefixes runs on the rollout thread (its draws then interleave with the trainer's, if any).
    seed: int | None = None


class Sampler(Protocol):
    """Samples responses for prompt rows; follows the training model's weights when told to."""

    def sample(self, prompts: list[list[int]], settings: SamplingSettings,
               prefixes: list[list[int]] | None = None) -> Responses:
        """One response per prompt row, continuing `prefixes[i]` (teacher tokens, flagged `from_teacher`)
        when given; the whole response, prefix included, is cut at settings.max_new_tokens."""
        ...

    def sync(self, model: nn.Module) -> None:
        """Take `model`'s current weights (after an optimizer step); a no-op for a sampler that is the model."""
        ...

    def close(self) -> None:
        """Free what the sampler holds (an engine's KV cache); a no-op when it holds nothing of its own."""
        ...


def draws(settings: SamplingSettings, *, stream: int) -> torch.Generator | None:
    """The generator of one stream of a step's draws (0: request seeds, 1: the batch's noise), or None for
    torch's global one (checkpointed, so resume redraws the same) when the settings carry no step seed."""
    if settings.seed is None:
        return None
    return torch.Generator().manual_seed(settings.seed * 2 + stream)


def place_prefixes(prefixes: list[list[int]], width: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """[N, width] ids holding each row's teacher prefix (cut at width) then padding, and its [N, width] bool
    `from_teacher` flags; the sampler writes its continuation after the prefix."""
    ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    from_teacher = torch.zeros(len(prefixes), width, dtype=torch.bool)
    for row, prefix in enumerate(prefixes):
        take = min(len(prefix), width)
        ids[row, :take] = torch.tensor(prefix[:take], dtype=torch.long)
        from_teacher[row, :take] = True
    return ids, from_teacher


def consecutive_groups(rows: list[list[int]]) -> list[tuple[int, int]]:
    """(start, count) of each run of identical consecutive rows: a prompt's samples, sent as one request."""
    groups: list[tuple[int, int]] = []
    for row, tokens in enumerate(rows):
        if groups and rows[groups[-1][0]] == tokens:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((row, 1))
    return groups


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


@dataclass(frozen=True, kw_only=True, slots=True)
class Responses:
    """Sampled responses of one generate call (or several, concatenated)."""

    ids: Tensor  # [N, T] right-padded
    mask: Tensor  # [N, T] bool, up to and including the first end-of-sequence token
    logprobs: Tensor  # [N, T] sampler log-probs (0 on padding and on tokens not sampled here)
    # [N, T] entropy of the sampling distribution (0 where not sampled here); None: the sampler (vLLM)
    # does not report it, and the training forward computes the student's entropy instead.
    entropy: Tensor | None
    truncated: Tensor  # [N] bool
    from_teacher: Tensor  # [N, T] bool, tokens copied from a teacher prefix


def finish_responses(ids: Tensor, logprobs: Tensor, entropy: Tensor | None, from_teacher: Tensor,
                     settings: SamplingSettings) -> Responses:
    """Cut each row after its first end-of-sequence token; zero what was not sampled there."""
    mask, truncated = response_mask_until_end(ids, settings.end_of_sequence_ids)
    return Responses(
        ids=ids.masked_fill(~mask, settings.pad_id),
        mask=mask,
        logprobs=logprobs.masked_fill(~mask | from_teacher, 0.0),
        entropy=entropy.masked_fill(~mask | from_teacher, 0.0) if entropy is not None else None,
        truncated=truncated,
        from_teacher=from_teacher & mask,
    )


def fixed_responses(responses: list[list[int]], settings: SamplingSettings, *, from_teacher: bool) -> Responses:
    """Responses not sampled by the student (teacher-written for sft, dataset answers for gkd)."""
    width = max(1, min(settings.max_new_tokens, max(len(r) for r in responses)))
    ids = torch.full((len(responses), width), settings.pad_id, dtype=torch.long)
    for row, response in enumerate(responses):
        ids[row, : min(len(response), width)] = torch.tensor(response[:width], dtype=torch.long)
    lengths = torch.tensor([min(len(r), width) for r in responses])
    mask = torch.arange(width)[None, :] < lengths[:, None]
    ends = torch.isin(ids, torch.tensor(settings.end_of_sequence_ids)) & mask
    return Responses(
        ids=ids, mask=mask, logprobs=torch.zeros(ids.shape), entropy=torch.zeros(ids.shape),
        truncated=~ends.any(dim=1), from_teacher=mask & from_teacher,
    )


def response_mask_until_end(response_ids: Tensor, end_ids: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """True up to and including the first end-of-sequence token; truncated rows have none."""
    is_end = torch.isin(response_ids, torch.tensor(end_ids, device=response_ids.device))
    ends_before = is_end.long().cumsum(dim=1) - is_end.long()  # end tokens strictly before each position
    mask = ends_before == 0
    truncated = ~is_end.any(dim=1)
    return mask, truncated


def concatenate(parts: list[Responses], pad_id: int) -> Responses:
    return Responses(
        ids=_cat_right_padded([p.ids for p in parts], pad_id),
        mask=_cat_right_padded([p.mask for p in parts], False),
        logprobs=_cat_right_padded([p.logprobs for p in parts], 0.0),
        entropy=None if any(p.entropy is None for p in parts) else _cat_right_padded([p.entropy for p in parts], 0.0),
        truncated=torch.cat([p.truncated for p in parts]),
        from_teacher=_cat_right_padded([p.from_teacher for p in parts], False),
    )


def sample_batch(sampler: Sampler, prompts: list[list[int]], prompt_indices: list[int], domains: list[str],
                 settings: SamplingSettings, *, step: int, prefixes: list[list[int]] | None = None) -> RolloutBatch:
    """One sampled response per prompt row (rows already repeated per sample), as a RolloutBatch."""
    responses = sampler.sample(prompts, settings, prefixes)
    return build_batch(prompts, prompt_indices, domains, responses, settings, step=step)


def build_batch(prompts: list[list[int]], prompt_indices: list[int], domains: list[str], responses: Responses,
                settings: SamplingSettings, *, step: int, from_dataset: Tensor | None = None) -> RolloutBatch:
    """Assemble a RolloutBatch, with the noise and entropy ranks drawn once for the whole batch."""
    prompt_ids, prompt_mask = left_pad(prompts, settings.pad_id)
    sampled = responses.mask & ~responses.from_teacher
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=responses.ids,
        response_mask=responses.mask,
        from_teacher=responses.from_teacher,
        sampler_logprobs=responses.logprobs,
        truncated=responses.truncated,
        domain=tuple(domains),
        prompt_index=tuple(prompt_indices),
        step=step,
        noise=torch.rand(responses.ids.shape, generator=draws(settings, stream=1)),
        sampler_entropy=responses.entropy,
        entropy_rank=rank_in_batch(responses.entropy, sampled) if responses.entropy is not None else None,
        from_dataset=from_dataset if from_dataset is not None else torch.zeros(len(prompts), dtype=torch.bool),
    )


def rank_in_batch(values: Tensor, mask: Tensor) -> Tensor:
    """Each masked value's rank among the masked values, scaled to [0, 1] (0 lowest); 0 elsewhere."""
    ranks = torch.zeros_like(values)
    selected = values[mask]
    if selected.numel() > 1:
        order = torch.argsort(torch.argsort(selected, stable=True), stable=True)
        ranks[mask] = order.to(values.dtype) / (selected.numel() - 1)
    return ranks


def _cat_right_padded(parts: list[Tensor], fill) -> Tensor:
    width = max(part.shape[1] for part in parts)
    padded = [torch.nn.functional.pad(p.cpu(), (0, width - p.shape[1]), value=fill) for p in parts]
    return torch.cat(padded, dim=0)
