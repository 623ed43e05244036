"""Teachers and references: the `Scorer` protocol, its in-process (Hugging Face) implementation, and the
routing of a rollout batch's rows to the scorers of their domain.

Routing is per row by its prompt's domain (G-OPD multi-teacher): each row is scored by its domain's
teacher and reference. There is no fallback teacher: a domain without one is an error at start-up
(checks.py). Models are loaded once and shared (assemble.py): a reference that is the student's initial
weights, or the same folder for several domains, is one model in memory.

What a scorer computes for a chunk of rows is a `TokenScores` (types.py); routing, the output tensors of
the whole batch and the floor live here, the chunked math in scoring.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from opd.packing import shortest_first
from opd.rollout.batch import Sampler, left_pad
from opd.runtime import distributed
from opd.runtime.lora import causal_lm, scoring_context
from opd.scoring import output_head, padded_mass, response_hidden_states, scatter_tokens, teacher_token_scores
from opd.types import RolloutBatch, ScoreRequest, TeacherScores, TokenScores


class Scorer(Protocol):
    """Scores response tokens with one frozen model (a teacher or a reference)."""

    # True when the model is FSDP-sharded across ranks: every rank must then run as many forwards.
    sharded: bool

    def score(self, request: ScoreRequest) -> TokenScores: ...

    def idle_forward(self) -> None:
        """A forward that only takes part in a sharded model's collectives (pairs another rank's real one)."""
        ...

    def close(self) -> None: ...


class HfScorer:
    """A `Scorer` that runs the model's forward in this process, chunked over the output head."""

    def __init__(self, model: nn.Module, *, temperature: float, chunk_size: int, packed: bool = False,
                 kept_width: int | None = None):
        self.model = model  # an HF causal LM, an FSDP-sharded one, or a LoRA student with adapters disabled
        self.temperature, self.chunk_size = temperature, chunk_size
        self.packed = packed  # padding-free forwards (optim.pack_sequences)
        # teachers.N.drop_padded_logits: score over the head's first kept_width ids only (the student's
        # width), renormalised; None: the whole head
        self.kept_width = kept_width
        self.sharded = distributed.is_sharded_model(model)

    @torch.no_grad()
    def score(self, request: ScoreRequest) -> TokenScores:
        device = self.model.device
        mask = request.response_mask.to(device)
        with scoring_context(self.model):  # a LoRA student's reference: the same model with adapters disabled
            hidden = response_hidden_states(self.model, request.prompt_ids.to(device), request.prompt_mask.to(device),
                                            request.response_ids.to(device), mask, packed=self.packed)
        whole_weight, whole_bias = output_head(self.model)
        weight, bias = whole_weight, whole_bias
        if self.kept_width is not None:  # log_softmax over the kept columns is the renormalised distribution
            weight = whole_weight[: self.kept_width]
            bias = whole_bias[: self.kept_width] if whole_bias is not None else None
        targets = request.response_ids.to(device)[mask]
        logprobs, topk_ids, topk_logprobs, entropy = teacher_token_scores(
            hidden[mask], weight, bias, targets, topk=request.topk,
            temperature=self.temperature, chunk_size=self.chunk_size, with_entropy=request.with_entropy,
        )
        dropped = None if self.kept_width is None else padded_mass(
            hidden[mask], whole_weight, whole_bias, targets, logprobs, kept_width=self.kept_width,
            temperature=self.temperature)
        return TokenScores(
            logprobs=logprobs.cpu(),
            topk_ids=topk_ids.cpu() if topk_ids is not None else None,
            topk_logprobs=topk_logprobs.cpu() if topk_logprobs is not None else None,
            entropy=entropy.cpu() if entropy is not None else None,
            hidden=hidden.cpu() if request.with_hidden else None,
            head=(weight, bias) if request.with_hidden else None,
            padded_mass=dropped.cpu() if dropped is not None else None,
        )

    @torch.no_grad()
    def idle_forward(self) -> None:
        input_ids = torch.zeros(1, 1, dtype=torch.long, device=self.model.device)
        causal_lm(self.model).base_model(input_ids=input_ids, use_cache=False)

    def close(self) -> None:
        pass


@dataclass(frozen=True, kw_only=True, slots=True)
class DomainScorer:
    """Everything needed to score one domain's rows."""

    domain: str
    teacher: Scorer | None  # None: the objective needs no teacher (e.g. grpo alone)
    reference: Scorer | None  # None: no reference (lam = 1 only; the implicit reward is then not logged)
    # Writes whole teacher responses (guidance prefixes, sft): the teacher's own sampler.
    writer: Sampler | None = None
    # Teacher prompt ids per dataset row, when the teacher renders prompts with its own chat template;
    # None: the teacher reads the student's prompt ids (checked identical at start-up).
    teacher_prompts: dict[int, list[int]] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ScoringSettings:
    topk: int  # 0: no top-k
    rows_per_forward: int
    logprob_floor: float
    need_reference: bool  # the objective or the metrics use lR
    need_entropy: bool = False  # H(pi_T) at each position
    need_hidden: bool = False  # teacher hidden states and heads for full-vocabulary losses
    group_by_length: bool = False  # a domain's rows scored shortest first (optim.group_by_length)


def score_batch(batch: RolloutBatch, scorers: dict[str, DomainScorer], settings: ScoringSettings) -> TeacherScores:
    """Teacher (and reference) scores of every response token, routed by domain, floored."""
    scores = _BatchScores(batch, settings)
    for domain, rows in rows_by_domain(batch, scorers):
        scorer = scorers[domain]
        if scorer.teacher is None:
            continue
        scores.has_teacher[rows] = True
        _pair_idle_forwards(scorer, len(rows), settings)
        if settings.group_by_length and len(rows) > settings.rows_per_forward:  # each chunk at its own width
            rows = rows[shortest_first(batch.prompt_mask[rows], batch.response_mask[rows])]
        for start in range(0, len(rows), settings.rows_per_forward):
            _score_chunk(scores, scorer, rows[start : start + settings.rows_per_forward], settings)
    return scores.floored()


def rows_by_domain(batch: RolloutBatch, scorers: dict[str, DomainScorer]) -> list[tuple[str, Tensor]]:
    """(domain, row indices [n]) in a fixed order. With a sharded scorer every rank walks the union of all
    ranks' domains (possibly with no rows of its own), so that the sharded forwards pair up."""
    domains = set(batch.domain)
    if any(_is_sharded(s) for s in scorers.values()):
        domains = set().union(*distributed.gather_objects(domains))
    return [(domain, torch.tensor([i for i, d in enumerate(batch.domain) if d == domain], dtype=torch.long))
            for domain in sorted(domains)]


def _is_sharded(scorer: DomainScorer) -> bool:
    return scorer.teacher is not None and scorer.teacher.sharded


def _pair_idle_forwards(scorer: DomainScorer, num_rows: int, settings: ScoringSettings) -> None:
    """On a sharded teacher, a rank with fewer chunks than another runs idle forwards to pair with it."""
    if not scorer.teacher.sharded:
        return
    local_chunks = -(-num_rows // settings.rows_per_forward)
    for _ in range(distributed.all_reduce_max(local_chunks) - local_chunks):
        scorer.teacher.idle_forward()
        if settings.need_reference and scorer.reference is not None:
            scorer.reference.idle_forward()


class _BatchScores:
    """The [N, T] outputs of score_batch, filled chunk by chunk."""

    def __init__(self, batch: RolloutBatch, settings: ScoringSettings):
        num_rows, width = batch.response_ids.shape
        k, self.settings, self.batch = settings.topk, settings, batch
        self.logprobs = torch.zeros(num_rows, width)
        self.ref_logprobs = torch.zeros(num_rows, width) if settings.need_reference else None
        self.topk_ids = torch.zeros(num_rows, width, k, dtype=torch.int32) if k else None
        self.topk_logprobs = torch.full((num_rows, width, k), settings.logprob_floor) if k else None
        self.entropy = torch.zeros(num_rows, width) if settings.need_entropy else None
        self.hidden: Tensor | None = None  # [N, T, H], allocated at the first chunk (H is the teacher's)
        self.heads: dict | None = {} if settings.need_hidden else None
        self.has_reference = torch.zeros(num_rows, dtype=torch.bool)
        self.has_teacher = torch.zeros(num_rows, dtype=torch.bool)
        self.padded_mass: Tensor | None = None  # [N, T], allocated at the first teacher that drops any
        self.drops_padded = torch.zeros(num_rows, dtype=torch.bool)

    def floored(self) -> TeacherScores:
        floor, mask = self.settings.logprob_floor, self.batch.response_mask
        floored = (self.logprobs < floor) & mask
        return TeacherScores(
            logprobs=self.logprobs.clamp(min=floor),
            topk_ids=self.topk_ids,
            topk_logprobs=self.topk_logprobs.clamp(min=floor) if self.topk_logprobs is not None else None,
            ref_logprobs=self.ref_logprobs.clamp(min=floor) if self.ref_logprobs is not None else None,
            has_reference=self.has_reference,
            has_teacher=self.has_teacher,
            floored=floored,
            entropy=self.entropy,
            hidden=self.hidden,
            heads=self.heads,
            padded_mass=self.padded_mass,
            drops_padded=self.drops_padded if self.padded_mass is not None else None,
        )


def _score_chunk(scores: _BatchScores, scorer: DomainScorer, chunk: Tensor, settings: ScoringSettings) -> None:
    """Score rows `chunk` of one domain with its teacher (and reference) into `scores`."""
    batch = scores.batch
    mask = batch.response_mask[chunk]
    prompt_ids, prompt_mask = _prompts_for(scorer, batch, chunk)
    teacher = scorer.teacher.score(ScoreRequest(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=batch.response_ids[chunk], response_mask=mask,
        topk=settings.topk, with_entropy=settings.need_entropy, with_hidden=settings.need_hidden,
    ))
    _check_finite(teacher.logprobs, f"teacher for domain '{scorer.domain}'")
    scores.logprobs[chunk] = scatter_tokens(teacher.logprobs, mask)
    if settings.topk:
        scores.topk_ids[chunk] = scatter_tokens(teacher.topk_ids, mask)
        scores.topk_logprobs[chunk] = scatter_tokens(teacher.topk_logprobs, mask, fill=settings.logprob_floor)
    if scores.entropy is not None:
        scores.entropy[chunk] = scatter_tokens(teacher.entropy, mask)
    if teacher.padded_mass is not None:
        if scores.padded_mass is None:
            scores.padded_mass = torch.zeros(batch.response_ids.shape)
        scores.padded_mass[chunk] = scatter_tokens(teacher.padded_mass.float(), mask)
        scores.drops_padded[chunk] = True
    if settings.need_hidden:
        scores.heads[scorer.domain] = teacher.head
        if scores.hidden is None:
            num_rows, width = batch.response_ids.shape
            scores.hidden = torch.zeros(num_rows, width, teacher.hidden.shape[-1], dtype=teacher.hidden.dtype)
        scores.hidden[chunk] = teacher.hidden
    if scores.ref_logprobs is None:
        return
    if scorer.reference is None:
        scores.ref_logprobs[chunk] = scores.logprobs[chunk]  # lam == 1 here (config check): zero reward
        return
    # The reference reads the student's prompt: it is the student-side anchor of the reward.
    reference = scorer.reference.score(ScoreRequest(
        prompt_ids=batch.prompt_ids[chunk], prompt_mask=batch.prompt_mask[chunk],
        response_ids=batch.response_ids[chunk], response_mask=mask,
    ))
    _check_finite(reference.logprobs, f"reference for domain '{scorer.domain}'")
    scores.ref_logprobs[chunk] = scatter_tokens(reference.logprobs, mask)
    scores.has_reference[chunk] = True


def _prompts_for(scorer: DomainScorer, batch: RolloutBatch, rows: Tensor) -> tuple[Tensor, Tensor]:
    if scorer.teacher_prompts is None:
        return batch.prompt_ids[rows], batch.prompt_mask[rows]
    # Any pad id will do: padded positions are masked out of attention.
    return left_pad([scorer.teacher_prompts[batch.prompt_index[int(r)]] for r in rows], pad_id=0)


def _check_finite(values: Tensor, what: str) -> None:
    if torch.isnan(values).any():
        raise FloatingPointError(
            f"the {what} produced NaN log-probs; the step is aborted (check the model's weights and dtype)"
        )
