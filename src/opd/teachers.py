"""Teachers and references: which model scores which row, and the scoring of a whole rollout batch.

Routing is per row by its prompt's domain (G-OPD multi-teacher): each row is scored by its domain's
teacher, with its domain's lam and reference. There is no fallback teacher: a domain without one is an
error at start-up (checks.py). Models are loaded once and shared: a reference that is the student's
initial weights, or the same folder for several domains, is one model in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from opd.scoring import output_head, response_hidden_states, scatter_tokens, teacher_token_scores
from opd.types import RolloutBatch, TeacherScores


@dataclass(frozen=True, kw_only=True, slots=True)
class DomainScorer:
    """Everything needed to score one domain's rows."""

    domain: str
    teacher: nn.Module
    reference: nn.Module | None
    reward_scale: float  # lam
    # Teacher prompt ids per dataset row, when the teacher renders prompts with its own chat template;
    # None: the teacher reads the student's prompt ids (checked identical at start-up).
    teacher_prompts: dict[int, list[int]] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ScoringSettings:
    temperature: float
    topk: int  # 0: no top-k
    chunk_size: int  # tokens per output-head chunk
    rows_per_forward: int
    logprob_floor: float
    need_reference: bool  # the objective or the metrics use lR


def score_batch(batch: RolloutBatch, scorers: dict[str, DomainScorer], settings: ScoringSettings) -> TeacherScores:
    """Teacher (and reference) scores of every sampled response token, routed by domain."""
    num_rows, width = batch.response_ids.shape
    logprobs = torch.zeros(num_rows, width)
    ref_logprobs = torch.zeros(num_rows, width) if settings.need_reference else None
    topk_ids = torch.zeros(num_rows, width, settings.topk, dtype=torch.int32) if settings.topk else None
    topk_logprobs = torch.full((num_rows, width, settings.topk), settings.logprob_floor) if settings.topk else None
    reward_scale = torch.ones(num_rows)
    has_reference = torch.zeros(num_rows, dtype=torch.bool)
    for domain in sorted(set(batch.domain)):
        scorer = scorers[domain]
        rows = torch.tensor([i for i, d in enumerate(batch.domain) if d == domain])
        reward_scale[rows] = scorer.reward_scale
        for start in range(0, len(rows), settings.rows_per_forward):
            chunk = rows[start : start + settings.rows_per_forward]
            mask = batch.response_mask[chunk]
            prompt_ids, prompt_mask = _prompts_for(scorer, batch, chunk)
            teacher = _score_model(scorer.teacher, prompt_ids, prompt_mask, batch, chunk, settings, settings.topk)
            _check_finite(teacher[0], f"teacher for domain '{domain}'")
            logprobs[chunk] = scatter_tokens(teacher[0], mask)
            if settings.topk:
                topk_ids[chunk] = scatter_tokens(teacher[1], mask)
                topk_logprobs[chunk] = scatter_tokens(teacher[2], mask, fill=settings.logprob_floor)
            if ref_logprobs is not None:
                if scorer.reference is None:
                    ref_logprobs[chunk] = logprobs[chunk]  # lam == 1 here (config check): zero reward
                else:
                    # The reference reads the student's prompt: it is the student-side anchor of the reward.
                    reference = _score_model(
                        scorer.reference, batch.prompt_ids[chunk], batch.prompt_mask[chunk], batch, chunk, settings, 0
                    )
                    _check_finite(reference[0], f"reference for domain '{domain}'")
                    ref_logprobs[chunk] = scatter_tokens(reference[0], mask)
                    has_reference[chunk] = True
    floored = (logprobs < settings.logprob_floor) & batch.response_mask
    logprobs = logprobs.clamp(min=settings.logprob_floor)
    if ref_logprobs is not None:
        ref_logprobs = ref_logprobs.clamp(min=settings.logprob_floor)
    if topk_logprobs is not None:
        topk_logprobs = topk_logprobs.clamp(min=settings.logprob_floor)
    return TeacherScores(
        logprobs=logprobs,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        ref_logprobs=ref_logprobs,
        has_reference=has_reference,
        reward_scale=reward_scale,
        floored=floored,
    )


def _prompts_for(scorer: DomainScorer, batch: RolloutBatch, rows: Tensor) -> tuple[Tensor, Tensor]:
    if scorer.teacher_prompts is None:
        return batch.prompt_ids[rows], batch.prompt_mask[rows]
    from opd.rollout import left_pad

    # Any pad id will do: padded positions are masked out of attention.
    return left_pad([scorer.teacher_prompts[batch.prompt_index[int(r)]] for r in rows], pad_id=0)


@torch.no_grad()
def _score_model(model, prompt_ids, prompt_mask, batch, rows, settings, topk):
    device = model.device
    mask = batch.response_mask[rows]
    hidden = response_hidden_states(
        model, prompt_ids.to(device), prompt_mask.to(device), batch.response_ids[rows].to(device), mask.to(device)
    )
    weight, bias = output_head(model)
    values = teacher_token_scores(
        hidden[mask.to(device)],
        weight,
        bias,
        batch.response_ids[rows][mask].to(device),
        topk=topk,
        temperature=settings.temperature,
        chunk_size=settings.chunk_size,
    )
    return tuple(v.cpu() if v is not None else None for v in values)


def _check_finite(values: Tensor, what: str) -> None:
    if torch.isnan(values).any():
        raise FloatingPointError(
            f"the {what} produced NaN log-probs; the step is aborted (check the model's weights and dtype)"
        )
