"""The policy-gradient OPD family (ALGORITHMS.md §1): `opd` and `gopd` (ExOPD, reward correction).

Every student-sampled token gets the dense advantage A_t (discount 0) and the loss -w_t * ratio_t * sg(A_t)
of `functional.policy_gradient_loss`. Tokens copied from a teacher prefix never get a policy-gradient term
(ALGORITHMS §3): `student_sampled` leaves them out. The helpers here are shared by every objective that
has a policy-gradient part (tropd, reopold, entropy_opd, aopd, grpo, eopd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opd.aggregate import masked_mean
from opd.functional import gopd_advantage, policy_gradient_loss
from opd.objectives import register
from opd.types import Metric, Reduce, RolloutBatch, Signal, StudentOutputs, TeacherScores, TokenLoss


@dataclass(frozen=True, kw_only=True, slots=True)
class PolicyGradientSettings:
    is_cap: float = 5.0
    clip_eps: float | None = None

    @classmethod
    def from_config(cls, config) -> "PolicyGradientSettings":
        return cls(is_cap=config.is_cap, clip_eps=config.clip_eps)


def student_sampled(batch: RolloutBatch) -> Tensor:  # [N, T] bool
    """Response tokens the student sampled itself (not copied from a teacher prefix)."""
    return batch.response_mask & ~batch.from_teacher


def policy_gradient_terms(advantages: Tensor, student: StudentOutputs, batch: RolloutBatch,
                          settings: PolicyGradientSettings) -> tuple[Tensor, Tensor]:
    """Unmasked per-token PG loss [N, T] and IS weight [N, T] (see functional.policy_gradient_loss)."""
    return policy_gradient_loss(student.logprobs, batch.sampler_logprobs, advantages,
                                is_cap=settings.is_cap, clip_eps=settings.clip_eps)


def policy_gradient_metrics(area: str, advantages: Tensor, weight: Tensor, mask: Tensor,
                            settings: PolicyGradientSettings) -> dict[str, Metric]:
    count = float(mask.sum())
    selected = advantages.detach()[mask]
    mean = masked_mean(advantages.detach(), mask)
    # STD carries count and mean so that micro-batches and ranks combine to the whole batch's std.
    std = float(selected.std()) if selected.numel() > 1 else 0.0
    return {
        f"{area}/advantage_mean": Metric(value=mean, weight=count),
        f"{area}/advantage_std": Metric(value=std, reduce=Reduce.STD, weight=count, mean=mean),
        f"{area}/is_weight_mean": Metric(value=masked_mean(weight, mask), weight=count),
        f"{area}/is_truncated_fraction": Metric(value=masked_mean((weight >= settings.is_cap).float(), mask),
                                                weight=count),
        f"{area}/tokens": Metric(value=count, reduce=Reduce.SUM),
    }


def masked_policy_gradient(area: str, advantages: Tensor, mask: Tensor, student: StudentOutputs, batch: RolloutBatch,
                           settings: PolicyGradientSettings) -> TokenLoss:
    """The PG loss on `mask` tokens only, with its metrics."""
    loss, weight = policy_gradient_terms(advantages, student, batch, settings)
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    return TokenLoss(per_token=loss, mask=mask, metrics=policy_gradient_metrics(area, advantages, weight, mask, settings))


def domain_advantage(student: StudentOutputs, teacher: TeacherScores, use_lam: bool) -> Tensor:
    """lT - lS, or the G-OPD advantage with each row's lam and reference."""
    if not use_lam:
        return gopd_advantage(student.logprobs.detach(), teacher.logprobs)
    lam = teacher.reward_scale[:, None]
    return gopd_advantage(student.logprobs.detach(), teacher.logprobs, teacher.ref_logprobs, lam)


@register("gopd")
@dataclass(frozen=True, kw_only=True, slots=True)
class GeneralizedOpd:
    """G-OPD: A = lam*(lT - lR) - (lS - lR), lam per row from its domain (ExOPD: lam > 1).

    Reward correction is this objective with the reference set to the teacher's pre-RL base.
    """

    settings: PolicyGradientSettings = PolicyGradientSettings()
    needs: frozenset[Signal] = frozenset({Signal.TEACHER_LOGPROBS, Signal.REF_LOGPROBS})

    @classmethod
    def from_config(cls, config, temperature: float) -> "GeneralizedOpd":
        return cls(settings=PolicyGradientSettings.from_config(config))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        advantages = domain_advantage(student, teacher, use_lam=True)
        return masked_policy_gradient("gopd", advantages, student_sampled(batch), student, batch, self.settings)


@register("opd")
@dataclass(frozen=True, kw_only=True, slots=True)
class Opd:
    """Plain on-policy distillation (tinker): A = lT - lS, reverse KL with the sampled-token estimator."""

    settings: PolicyGradientSettings = PolicyGradientSettings()
    needs: frozenset[Signal] = frozenset({Signal.TEACHER_LOGPROBS})

    @classmethod
    def from_config(cls, config, temperature: float) -> "Opd":
        return cls(settings=PolicyGradientSettings.from_config(config))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        advantages = domain_advantage(student, teacher, use_lam=False)
        return masked_policy_gradient("opd", advantages, student_sampled(batch), student, batch, self.settings)
