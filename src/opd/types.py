"""The data objects that flow through one training step. Data only, and two helpers that copy it (to a
device, a slice of rows).

Shape vocabulary, used in every shape comment of the package:
    N  rollouts (sampled responses) in a batch
    P  padded prompt width (prompts are left-padded)
    T  padded response width (responses are right-padded)
    K  teacher top-k
    V  vocabulary size
    H  hidden size

Log-prob names follow docs/algorithms.md: lS student, lOld sampler, lT teacher, lR reference.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor


class Signal(enum.Enum):
    """What an objective needs computed before it can run. The scorer computes exactly these."""

    TEACHER_LOGPROBS = "teacher_logprobs"
    TEACHER_TOPK = "teacher_topk"  # the teacher's top-k ids and log-probs at each position
    TEACHER_ENTROPY = "teacher_entropy"  # H(pi_T) over the full vocabulary at each position
    REF_LOGPROBS = "ref_logprobs"
    REWARD = "reward"  # outcome rewards from each domain's grader
    FULL_DISTRIBUTIONS = "full_distributions"  # teacher and student hidden states + heads (full-vocabulary losses)
    # What the rollout must provide (asked by config validation and the collector, not by the scorer):
    SAMPLER_ENTROPY = "sampler_entropy"  # RolloutBatch.entropy_rank: the sampling distribution's entropy
    TEACHER_RESPONSES = "teacher_responses"  # every response is written by the domain's teacher (sft)


class Reduce(enum.Enum):
    """How a metric combines across micro-batches (and ranks)."""

    MEAN = "mean"  # weighted by Metric.weight
    MAX = "max"
    MIN = "min"
    SUM = "sum"
    # Unbiased standard deviation, combined exactly from each part's (count, mean, std): Metric.weight is
    # the count and Metric.mean the mean of the values (a weighted mean of the parts' stds is not the std).
    STD = "std"


@dataclass(frozen=True, kw_only=True, slots=True)
class Metric:
    value: float
    reduce: Reduce = Reduce.MEAN
    weight: float = 1.0  # for Reduce.MEAN and Reduce.STD: number of items the value is over
    mean: float = 0.0  # for Reduce.STD: the mean of those items


@dataclass(frozen=True, kw_only=True, slots=True)
class RolloutBatch:
    """Prompts with sampled responses. Built by rollout, never modified afterwards."""

    prompt_ids: Tensor  # [N, P] long, left-padded with the pad id
    prompt_mask: Tensor  # [N, P] bool, True on real prompt tokens
    response_ids: Tensor  # [N, T] long, right-padded with the pad id
    response_mask: Tensor  # [N, T] bool, True where a loss may apply (response tokens up to and incl. EOS)
    from_teacher: Tensor  # [N, T] bool, tokens copied from a teacher prefix (algorithms §3)
    sampler_logprobs: Tensor  # [N, T] float32, lOld: log-prob under the distribution the token was drawn from
    truncated: Tensor  # [N] bool, the response hit max_new_tokens without an end-of-sequence token
    domain: tuple[str, ...]  # [N] selects teacher, lam and reference
    prompt_index: tuple[int, ...]  # [N] row of the prompt in the dataset (groups samples of one prompt)
    step: int = 0  # the optimizer step this batch was sampled for (schedules read it)
    # Uniform [0, 1) draws fixed at rollout time, for stochastic token selection (TrOPD's Bernoulli trust
    # mask): drawn per batch, they make the selection independent of how the batch is cut into micro-batches.
    noise: Tensor | None = None  # [N, T] float32
    # Entropy of the sampling distribution at each position, and its rank in the batch (0 lowest, 1 highest):
    # with the HF backend the sampler is the current student, so this is the student's entropy.
    sampler_entropy: Tensor | None = None  # [N, T] float32
    entropy_rank: Tensor | None = None  # [N, T] float32 in [0, 1]
    from_dataset: Tensor | None = None  # [N] bool, the response is the dataset's (GKD's off-policy mix)
    rewards: Tensor | None = None  # [N] float32, grader outcome rewards
    group_advantages: Tensor | None = None  # [N] float32, rewards normalised within each prompt's group (GRPO)
    grading_failed: Tensor | None = None  # [N] bool, the grade could not be computed (counted as reward 0)

    @property
    def sampled_by_student(self) -> Tensor:  # [N, T] bool
        """Response tokens the student drew itself: not a teacher prefix, not sft's teacher response (both
        flagged from_teacher), not a dataset answer (gkd's mix)."""
        mask = self.response_mask & ~self.from_teacher
        return mask & ~self.from_dataset[:, None] if self.from_dataset is not None else mask

    @property
    def num_rows(self) -> int:
        return self.response_ids.shape[0]


@dataclass(frozen=True, kw_only=True, slots=True)
class TeacherScores:
    """Detached scores of the sampled response tokens by each row's domain teacher and reference."""

    logprobs: Tensor  # [N, T] float32, lT at the scoring temperature (floored, see scoring.py)
    topk_ids: Tensor | None  # [N, T, K] int32, the teacher's K most likely next tokens
    topk_logprobs: Tensor | None  # [N, T, K] float32, their teacher log-probs
    ref_logprobs: Tensor | None  # [N, T] float32, lR; None when no row has a reference
    has_reference: Tensor  # [N] bool; rows without one (lam == 1 only) carry lR = lT, a zero reward
    has_teacher: Tensor  # [N] bool; domains without a teacher (grpo alone) carry lT = 0
    floored: Tensor  # [N, T] bool, teacher log-prob was -inf (or below the floor) and was clamped
    entropy: Tensor | None = None  # [N, T] float32, H(pi_T) at each position
    # Full-vocabulary losses (gkd) recompute teacher logits chunk by chunk from these:
    hidden: Tensor | None = None  # [N, T, H_teacher]
    heads: dict[str, tuple[Tensor, Tensor | None]] | None = None  # domain -> (weight [V, H], bias [V] | None)
    # [N, T] teacher probability on the padded ids dropped (teachers.N.drop_padded_logits), valid in rows
    # `drops_padded` [N] bool; None when no teacher drops any
    padded_mass: Tensor | None = None
    drops_padded: Tensor | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class StudentOutputs:
    """The student's view of the sampled tokens, from the training forward pass."""

    logprobs: Tensor  # [N, T] float32, lS with gradient
    entropy: Tensor | None  # [N, T] float32, detached H(pi_S) at each response position
    topk_logprobs: Tensor | None  # [N, T, K] float32, lS at the teacher's top-k ids, with gradient
    topk_ids: Tensor | None = None  # [N, T, K] int32, the student's own K most likely tokens (top-k metrics)
    hidden: Tensor | None = None  # [N, T, H] with gradient (full-vocabulary losses)
    head: tuple[Tensor, Tensor | None] | None = None  # (weight [V, H], bias [V] | None), with gradient


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenLoss:
    """What an objective returns: per-token losses, never reduced (aggregate.py reduces)."""

    per_token: Tensor  # [N, T] float32, with gradient; zero where mask is False
    mask: Tensor  # [N, T] bool, tokens that bear loss (the aggregation denominator counts these)
    metrics: dict[str, Metric] = field(default_factory=dict)
    # What the objective computed per token, for samples.jsonl: a TOKEN_DIAGNOSTICS name -> [N, T] float32,
    # detached, nan where the value does not apply (tokens outside the objective's selection). Only the
    # names an objective computes anyway are filled; the loop keeps them on sample steps only.
    diagnostics: Mapping[str, Tensor] = field(default_factory=dict)


# The per-token values an objective may report in TokenLoss.diagnostics. advantage: the A_t its
# policy-gradient term used; trust_probability: TrOPD's min(pi_T / pi_S, 1); outlier: 1.0 where TrOPD's
# Bernoulli draw made the token an outlier, 0.0 where it was trusted.
TOKEN_DIAGNOSTICS = ("advantage", "trust_probability", "outlier")


@dataclass(frozen=True, kw_only=True, slots=True)
class ScoreRequest:
    """Rows of responses for one model (a teacher or a reference) to score, and which scores to compute."""

    prompt_ids: Tensor  # [n, P] long, left-padded (the scoring model's own rendering of the prompt)
    prompt_mask: Tensor  # [n, P] bool
    response_ids: Tensor  # [n, T] long
    response_mask: Tensor  # [n, T] bool; M = response_mask.sum() tokens are scored
    topk: int = 0  # K most likely tokens at each position; 0: none
    with_entropy: bool = False  # H(pi) over the full vocabulary at each position
    with_hidden: bool = False  # hidden states and output head, for full-vocabulary losses


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenScores:
    """One model's detached scores of a ScoreRequest's response tokens, flattened over its response mask."""

    logprobs: Tensor  # [M] float32, log-prob of each response token at the scoring temperature
    topk_ids: Tensor | None = None  # [M, K] int32, most likely first
    topk_logprobs: Tensor | None = None  # [M, K] float32
    entropy: Tensor | None = None  # [M] float32
    hidden: Tensor | None = None  # [n, T, H] hidden states at the response positions
    head: tuple[Tensor, Tensor | None] | None = None  # (weight [V, H], bias [V] | None), with `hidden`
    # [M] probability on the padded ids a teacher's scores dropped (teachers.N.drop_padded_logits), else None
    padded_mass: Tensor | None = None


def to_device(data, device):
    """The same dataclass with every tensor field on `device` (a no-op on the CPU)."""
    values = {}
    for item in dataclasses.fields(data):
        value = getattr(data, item.name)
        values[item.name] = value.to(device) if isinstance(value, Tensor) else value
    return type(data)(**values)


def select_rows(data, rows: slice | Tensor):
    """The same dataclass with every per-row field (tensors on dim 0, tuples) cut to `rows` (a slice, or
    row indices [n] in the order wanted)."""
    values = {}
    for item in dataclasses.fields(data):
        value = getattr(data, item.name)
        if isinstance(value, tuple) and isinstance(rows, Tensor):
            value = tuple(value[row] for row in rows.tolist())
        elif isinstance(value, (Tensor, tuple)):
            value = value[rows]
        values[item.name] = value
    return type(data)(**values)
