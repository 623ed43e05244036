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

from opd.runtime import distributed
from opd.runtime.lora import scoring_context
from opd.rollout.vllm import VllmEngine
from opd.scoring import output_head, response_hidden_states, scatter_tokens, teacher_token_scores
from opd.types import RolloutBatch, TeacherScores


@dataclass(frozen=True, kw_only=True, slots=True)
class DomainScorer:
    """Everything needed to score one domain's rows."""

    domain: str
    # A model scored in this process, or a vLLM engine (teachers.*.backend: vllm); None: the objective
    # needs no teacher (e.g. grpo alone).
    teacher: nn.Module | VllmEngine | None
    reference: nn.Module | None
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
    need_entropy: bool = False  # H(pi_T) at each position
    need_hidden: bool = False  # teacher hidden states and heads for full-vocabulary losses


def score_batch(batch: RolloutBatch, scorers: dict[str, DomainScorer], settings: ScoringSettings) -> TeacherScores:
    """Teacher (and reference) scores of every response token, routed by domain."""
    num_rows, width = batch.response_ids.shape
    k = settings.topk
    logprobs = torch.zeros(num_rows, width)
    ref_logprobs = torch.zeros(num_rows, width) if settings.need_reference else None
    topk_ids = torch.zeros(num_rows, width, k, dtype=torch.int32) if k else None
    topk_logprobs = torch.full((num_rows, width, k), settings.logprob_floor) if k else None
    entropy = torch.zeros(num_rows, width) if settings.need_entropy else None
    hidden, heads = None, {} if settings.need_hidden else None
    has_reference = torch.zeros(num_rows, dtype=torch.bool)
    has_teacher = torch.zeros(num_rows, dtype=torch.bool)
    sharded = any(distributed.is_sharded_model(s.teacher) for s in scorers.values())
    domains = set(batch.domain)
    if sharded:  # every rank must walk the same domains and run as many forwards through a sharded model
        domains = set().union(*distributed.gather_objects(domains))
    for domain in sorted(domains):
        scorer = scorers[domain]
        rows = torch.tensor([i for i, d in enumerate(batch.domain) if d == domain], dtype=torch.long)
        if scorer.teacher is None:
            continue
        has_teacher[rows] = True
        if heads is not None:
            heads[domain] = output_head(scorer.teacher)
        local_chunks = -(-len(rows) // settings.rows_per_forward)
        if distributed.is_sharded_model(scorer.teacher):
            for _ in range(distributed.all_reduce_max(local_chunks) - local_chunks):
                _idle_forward(scorer.teacher)  # pairs with another rank's real forward (same order)
                if ref_logprobs is not None and scorer.reference is not None:
                    _idle_forward(scorer.reference)
        for start in range(0, len(rows), settings.rows_per_forward):
            chunk = rows[start : start + settings.rows_per_forward]
            mask = batch.response_mask[chunk]
            prompt_ids, prompt_mask = _prompts_for(scorer, batch, chunk)
            if isinstance(scorer.teacher, VllmEngine):
                scores = _score_engine(scorer.teacher, prompt_ids, prompt_mask, batch, chunk, k)
            else:
                scores = _score_model(scorer.teacher, prompt_ids, prompt_mask, batch, chunk, settings, k,
                                      settings.need_entropy, settings.need_hidden)
            _check_finite(scores[0], f"teacher for domain '{domain}'")
            logprobs[chunk] = scatter_tokens(scores[0], mask)
            if k:
                topk_ids[chunk] = scatter_tokens(scores[1], mask)
                topk_logprobs[chunk] = scatter_tokens(scores[2], mask, fill=settings.logprob_floor)
            if entropy is not None:
                entropy[chunk] = scatter_tokens(scores[3], mask)
            if settings.need_hidden:
                if hidden is None:
                    hidden = torch.zeros(num_rows, width, scores[4].shape[-1], dtype=scores[4].dtype)
                hidden[chunk] = scores[4]
            if ref_logprobs is not None:
                if scorer.reference is None:
                    ref_logprobs[chunk] = logprobs[chunk]  # lam == 1 here (config check): zero reward
                else:
                    # The reference reads the student's prompt: it is the student-side anchor of the reward.
                    reference = _score_model(scorer.reference, batch.prompt_ids[chunk], batch.prompt_mask[chunk],
                                             batch, chunk, settings, 0, False, False)
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
        has_teacher=has_teacher,
        floored=floored,
        entropy=entropy,
        hidden=hidden,
        heads=heads,
    )


def _prompts_for(scorer: DomainScorer, batch: RolloutBatch, rows: Tensor) -> tuple[Tensor, Tensor]:
    if scorer.teacher_prompts is None:
        return batch.prompt_ids[rows], batch.prompt_mask[rows]
    from opd.rollout.batch import left_pad

    # Any pad id will do: padded positions are masked out of attention.
    return left_pad([scorer.teacher_prompts[batch.prompt_index[int(r)]] for r in rows], pad_id=0)


@torch.no_grad()
def _score_model(model, prompt_ids, prompt_mask, batch, rows, settings, topk, with_entropy, with_hidden):
    device = model.device
    mask = batch.response_mask[rows]
    with scoring_context(model):  # a LoRA student's reference: the same model with adapters disabled
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
        with_entropy=with_entropy,
    )
    values = tuple(v.cpu() if v is not None else None for v in values)
    return (*values, hidden.cpu() if with_hidden else None)


def _score_engine(engine: VllmEngine, prompt_ids, prompt_mask, batch, rows, topk):
    """`_score_model`'s tuple from a vLLM engine (temperature 1, checked at load; no entropy, no hidden)."""
    prompts = [ids[mask].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
    responses = [ids[mask].tolist() for ids, mask in zip(batch.response_ids[rows], batch.response_mask[rows],
                                                          strict=True)]
    scored = engine.score(prompts, responses, topk)
    logprobs = torch.cat([s.logprobs for s in scored])
    if not topk:
        return logprobs, None, None, None, None
    return (logprobs, torch.cat([s.topk_ids for s in scored]), torch.cat([s.topk_logprobs for s in scored]),
            None, None)


@torch.no_grad()
def _idle_forward(model) -> None:
    """A one-token forward whose only purpose is taking part in a sharded model's collectives."""
    from opd.runtime.lora import causal_lm

    causal_lm(model).base_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), use_cache=False)


def _check_finite(values: Tensor, what: str) -> None:
    if torch.isnan(values).any():
        raise FloatingPointError(
            f"the {what} produced NaN log-probs; the step is aborted (check the model's weights and dtype)"
        )
