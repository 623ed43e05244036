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
    synced: bool = False  # more than one process shares the student (FSDP)


class _SampledLogprobRecorder:
    """Logits processor that records log pi_sampler(token) for each generated token."""

    def __init__(self) -> None:
        self.previous: Tensor | None = None  # [N, V] log-probs of the last step
        self.recorded: list[Tensor] = []  # per step: [N]
        self.entropies: list[Tensor] = []  # per step: [N], entropy of the sampling distribution

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:
            self.recorded.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        probabilities = self.previous.exp()
        # p log p with p = 0 (top-p removed the token, log p = -inf) contributes 0, not NaN.
        self.entropies.append(-(probabilities * self.previous.nan_to_num(neginf=0.0)).sum(dim=-1))
        return scores

    def finish(self, last_tokens: Tensor) -> tuple[Tensor, Tensor]:  # log-probs, entropies: [N, steps]
        if self.previous is not None:
            self.recorded.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
            self.previous = None
        return torch.stack(self.recorded, dim=1), torch.stack(self.entropies, dim=1)


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


@torch.no_grad()
def generate_responses(
    model: nn.Module, prompts: list[list[int]], settings: SamplingSettings, prefixes: list[list[int]] | None = None
) -> Responses:
    """One sampled response per prompt row, continuing `prefixes[i]` (teacher tokens) when given.

    A prefix is part of the response (flagged in `from_teacher`), the model continues after it, and the
    whole response is cut at max_new_tokens.
    """
    from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    prefixes = prefixes or [[] for _ in prompts]
    prompt_ids, prompt_mask = left_pad([p + x for p, x in zip(prompts, prefixes, strict=True)], settings.pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(model.device), prompt_mask.to(model.device)
    recorder = _SampledLogprobRecorder()
    processors = [TemperatureLogitsWarper(settings.temperature)]
    if settings.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=settings.top_p))
    processors.append(recorder)
    longest_prefix = max(len(x) for x in prefixes)
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,  # ours are in `processors`, ahead of the recorder
        top_p=1.0,
        top_k=0,
        max_new_tokens=max(settings.max_new_tokens - min(len(x) for x in prefixes), 1),
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
            # Sharded (FSDP) students need every rank in every forward: ranks keep stepping until all finish.
            synced_gpus=settings.synced,
        )
    finally:
        model.train(was_training)
    generated = sequences[:, prompt_ids.shape[1] :].cpu()
    logprobs, entropy = (t.cpu() for t in recorder.finish(sequences[:, -1]))
    if longest_prefix == 0:
        return finish_responses(generated, logprobs, entropy, torch.zeros_like(generated, dtype=torch.bool), settings)
    width = settings.max_new_tokens
    ids = torch.full((len(prompts), width), settings.pad_id, dtype=torch.long)
    row_logprobs, row_entropy = torch.zeros(len(prompts), width), torch.zeros(len(prompts), width)
    from_teacher = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prefix in enumerate(prefixes):
        take = min(len(prefix), width)
        ids[row, :take] = torch.tensor(prefix[:take], dtype=torch.long)
        from_teacher[row, :take] = True
        rest = min(width - take, generated.shape[1])
        ids[row, take : take + rest] = generated[row, :rest]
        row_logprobs[row, take : take + rest] = logprobs[row, :rest]
        row_entropy[row, take : take + rest] = entropy[row, :rest]
    return finish_responses(ids, row_logprobs, row_entropy, from_teacher, settings)


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


def sample_responses(policy, prompts: list[list[int]], settings: SamplingSettings,
                     prefixes: list[list[int]] | None = None) -> Responses:
    """Sample with `policy`: an HF model (`generate`, `batch_size` rows at a time) or a vLLM engine."""
    from opd.rollout_vllm import VllmEngine  # does not import vllm itself

    if isinstance(policy, VllmEngine):
        return policy.sample(prompts, settings, prefixes)
    return sample_in_batches(policy, prompts, settings, prefixes)


def sample_in_batches(model: nn.Module, prompts: list[list[int]], settings: SamplingSettings,
                      prefixes: list[list[int]] | None = None) -> Responses:
    parts = []
    for start in range(0, len(prompts), settings.batch_size):
        stop = start + settings.batch_size
        parts.append(generate_responses(model, prompts[start:stop], settings,
                                        prefixes[start:stop] if prefixes is not None else None))
    return concatenate(parts, settings.pad_id)


def rollout(
    policy,  # an HF model or a vLLM engine (sample_responses)
    prompt_token_ids: list[list[int]],  # one entry per prompt
    prompt_indices: list[int],  # dataset row of each prompt
    domains: list[str],
    settings: SamplingSettings,
    *,
    step: int = 0,
) -> RolloutBatch:
    """`samples_per_prompt` student responses per prompt, generated `batch_size` rows at a time."""
    rows = [
        (ids, index, domain)
        for ids, index, domain in zip(prompt_token_ids, prompt_indices, domains, strict=True)
        for _ in range(settings.samples_per_prompt)
    ]
    responses = sample_responses(policy, [ids for ids, _, _ in rows], settings)
    return build_batch([ids for ids, _, _ in rows], [i for _, i, _ in rows], [d for _, _, d in rows], responses,
                       settings, step=step)


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
        noise=torch.rand(responses.ids.shape),  # global RNG: saved in checkpoints, so resume redraws the same
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
