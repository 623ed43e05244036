"""Divergence objectives: top-k forward KL, TrOPD's top-k JSD baseline, and GKD's full-vocabulary JSD."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from opd.functional import topk_forward_kl
from opd.objectives import BuildContext, options, register
from opd.objectives.fullvocab import chunked_generalized_jsd
from opd.objectives.pg import (
    PolicyGradientSettings,
    diagnostic,
    masked,
    mean_metric,
    policy_gradient_terms,
    student_sampled,
)
from opd.types import RolloutBatch, Signal, StudentOutputs, TeacherScores, TokenLoss


def _beta_problems(beta: float, where: str) -> list[str]:
    return [] if 0 <= beta <= 1 else [f"{where}.beta: must be in [0, 1]"]


@dataclass(frozen=True, kw_only=True, slots=True)
class JsdTopkOptions:
    """objective.jsd_topk"""

    beta: float = 0.5  # weight of the teacher in the mixture p_M = beta p_T + (1 - beta) p_S

    def problems(self, where: str) -> list[str]:
        return _beta_problems(self.beta, where)


@dataclass(frozen=True, kw_only=True, slots=True)
class GkdOptions:
    """objective.gkd"""

    beta: float = 0.5  # 0 forward KL, 1 reverse KL (TRL's convention)

    def problems(self, where: str) -> list[str]:
        return _beta_problems(self.beta, where)


@dataclass(frozen=True, kw_only=True, slots=True)
class FklTopkOptions:
    """objective.fkl_topk"""

    # Add the mass outside the teacher's top-k as one more category, teacher's 1 - sum p_T against the
    # student's 1 - sum p_S (algorithms §2): the student is then also pulled off tokens the teacher leaves out.
    tail_bucket: bool = False

    def problems(self, where: str) -> list[str]:
        return []


@register("fkl_topk")
@dataclass(frozen=True, kw_only=True, slots=True)
class TopkForwardKl:
    """sum_{v in topk_T} p_T(v) (lT_v - lS_v) on every student token (TrOPD reports it collapses alone),
    with the tail bucket t_T (log t_T - log t_S) when `tail_bucket`."""

    renormalize: bool = False
    tail_bucket: bool = False
    needs: frozenset[Signal] = frozenset({Signal.TEACHER_TOPK})
    uses_lam: ClassVar[bool] = False
    takes_dataset_responses: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config, context: BuildContext) -> "TopkForwardKl":
        return cls(renormalize=config.renormalize, **options(config.fkl_topk))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        mask = student_sampled(batch)
        loss = masked(topk_forward_kl(student.topk_logprobs, teacher.topk_logprobs, self.renormalize,
                                      self.tail_bucket), mask)
        mass = student.topk_logprobs.detach().exp().sum(dim=-1)
        return TokenLoss(per_token=loss, mask=mask, metrics={
            "fkl_topk/loss": mean_metric(loss.detach(), mask),
            "fkl_topk/student_topk_mass": mean_metric(mass, mask),
        })


@register("jsd_topk")
@dataclass(frozen=True, kw_only=True, slots=True)
class TopkJsd:
    """TrOPD's JSD baseline: beta * sum_{v in topk_T} p_T(v) log(p_T(v) / p_M(v))  (with gradient through p_M)
    + (1 - beta) * a policy-gradient term with reward -log(p_S(y) / p_M(y)) on the sampled token,
    p_M = beta p_T + (1 - beta) p_S.
    """

    beta: float = 0.5
    settings: PolicyGradientSettings = PolicyGradientSettings()
    needs: frozenset[Signal] = frozenset({Signal.TEACHER_LOGPROBS, Signal.TEACHER_TOPK})
    uses_lam: ClassVar[bool] = False
    takes_dataset_responses: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config, context: BuildContext) -> "TopkJsd":
        return cls(**options(config.jsd_topk), settings=PolicyGradientSettings.from_config(config))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        mask = student_sampled(batch)
        topk_teacher = teacher.topk_logprobs
        topk_mixture = _log_mixture(topk_teacher, student.topk_logprobs, self.beta)
        forward = (topk_teacher.exp() * (topk_teacher - topk_mixture)).sum(dim=-1)
        sampled_mixture = _log_mixture(teacher.logprobs, student.logprobs.detach(), self.beta)
        reward = sampled_mixture - student.logprobs.detach()  # -log(p_S(y) / p_M(y))
        reverse, _ = policy_gradient_terms(reward, student, batch, self.settings)
        loss = masked(self.beta * forward + (1.0 - self.beta) * reverse, mask)
        return TokenLoss(per_token=loss, mask=mask, metrics={
            "jsd_topk/forward_term": mean_metric(forward.detach(), mask),
            "jsd_topk/reward_mean": mean_metric(reward, mask),
        }, diagnostics={"advantage": diagnostic(reward, mask)})  # the reward of its policy-gradient term


def _log_mixture(teacher_logprobs, student_logprobs, beta: float):
    """log(beta p_T + (1 - beta) p_S), stable at the end points."""
    if beta == 0.0:
        return student_logprobs
    if beta == 1.0:
        return teacher_logprobs
    return torch.logaddexp(teacher_logprobs + math.log(beta), student_logprobs + math.log1p(-beta))


@register("gkd")
@dataclass(frozen=True, kw_only=True, slots=True)
class Gkd:
    """GKD (Agarwal et al. 2024): generalized JSD_beta over the full vocabulary at every response position,
    computed chunk by chunk (fullvocab.py). beta = 0 forward KL, beta = 1 reverse KL (TRL's convention).
    Dataset responses mixed in by `objective.onpolicy_fraction` get the same loss (GKD's lambda).
    """

    beta: float = 0.5
    temperature: float = 1.0
    chunk_size: int = 512
    needs: frozenset[Signal] = frozenset({Signal.FULL_DISTRIBUTIONS})
    uses_lam: ClassVar[bool] = False
    takes_dataset_responses: ClassVar[bool] = True  # a divergence of full distributions: any response will do

    @classmethod
    def from_config(cls, config, context: BuildContext) -> "Gkd":
        return cls(**options(config.gkd), temperature=context.temperature)

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        mask = student_sampled(batch)
        weight, bias = student.head
        loss = torch.zeros_like(student.logprobs)
        for domain in sorted(set(batch.domain)):
            rows = torch.tensor([d == domain for d in batch.domain], device=mask.device)
            positions = mask & rows[:, None]
            if not positions.any():
                continue
            teacher_weight, teacher_bias = teacher.heads[domain]
            values = chunked_generalized_jsd(
                student.hidden[positions], weight, bias, teacher.hidden[positions].to(student.hidden.device),
                teacher_weight, teacher_bias, beta=self.beta, temperature=self.temperature, chunk_size=self.chunk_size,
            )
            loss = loss.index_put((positions.nonzero(as_tuple=True)), values.to(loss.dtype))
        return TokenLoss(per_token=loss, mask=mask, metrics={"gkd/jsd": mean_metric(loss.detach(), mask)})
