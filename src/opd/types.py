"""The data objects that flow through one training step. Data only, no logic.

Shape vocabulary, used in every shape comment of the package:
    N  rollouts (sampled responses) in a batch
    P  padded prompt width (prompts are left-padded)
    T  padded response width (responses are right-padded)
    K  teacher top-k
    V  vocabulary size
    H  hidden size

Log-prob names follow ALGORITHMS.md: lS student, lOld sampler, lT teacher, lR reference.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from torch import Tensor


class Signal(enum.Enum):
    """What an objective needs computed before it can run. The scorer computes exactly these."""

    TEACHER_LOGPROBS = "teacher_logprobs"
    TEACHER_TOPK = "teacher_topk"
    REF_LOGPROBS = "ref_logprobs"
    STUDENT_ENTROPY = "student_entropy"


class Reduce(enum.Enum):
    """How a metric combines across micro-batches (and ranks)."""

    MEAN = "mean"  # weighted by Metric.weight
    MAX = "max"
    MIN = "min"
    SUM = "sum"


@dataclass(frozen=True, kw_only=True, slots=True)
class Metric:
    value: float
    reduce: Reduce = Reduce.MEAN
    weight: float = 1.0  # for Reduce.MEAN: number of items the value averages over


@dataclass(frozen=True, kw_only=True, slots=True)
class RolloutBatch:
    """Prompts with sampled responses. Built by rollout, never modified afterwards."""

    prompt_ids: Tensor  # [N, P] long, left-padded with the pad id
    prompt_mask: Tensor  # [N, P] bool, True on real prompt tokens
    response_ids: Tensor  # [N, T] long, right-padded with the pad id
    response_mask: Tensor  # [N, T] bool, True where a loss may apply (response tokens up to and incl. EOS)
    from_teacher: Tensor  # [N, T] bool, tokens copied from a teacher prefix (ALGORITHMS §3)
    sampler_logprobs: Tensor  # [N, T] float32, lOld: log-prob under the distribution the token was drawn from
    truncated: Tensor  # [N] bool, the response hit max_new_tokens without an end-of-sequence token
    domain: tuple[str, ...]  # [N] selects teacher, lam and reference
    prompt_index: tuple[int, ...]  # [N] row of the prompt in the dataset (groups samples of one prompt)

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
    reward_scale: Tensor  # [N] float32, lam of each row's domain (ALGORITHMS §1)
    floored: Tensor  # [N, T] bool, teacher log-prob was -inf (or below the floor) and was clamped


@dataclass(frozen=True, kw_only=True, slots=True)
class StudentOutputs:
    """The student's view of the sampled tokens, from the training forward pass."""

    logprobs: Tensor  # [N, T] float32, lS with gradient
    entropy: Tensor | None  # [N, T] float32, detached H(pi_S) at each response position
    topk_logprobs: Tensor | None  # [N, T, K] float32, lS at the teacher's top-k ids, with gradient


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenLoss:
    """What an objective returns: per-token losses, never reduced (aggregate.py reduces)."""

    per_token: Tensor  # [N, T] float32, with gradient; zero where mask is False
    mask: Tensor  # [N, T] bool, tokens that bear loss (the aggregation denominator counts these)
    metrics: dict[str, Metric] = field(default_factory=dict)
