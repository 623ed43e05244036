"""The policy-gradient OPD family (ALGORITHMS.md §1): `opd` and `gopd` (ExOPD, reward correction).

Every response token gets the dense advantage A_t (discount 0) and the loss -w_t * ratio_t * sg(A_t)
of `functional.policy_gradient_loss`. Tokens copied from a teacher prefix never get a policy-gradient
term (ALGORITHMS §3): they are left out of this objective's mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.aggregate import masked_mean
from opd.functional import gopd_advantage, policy_gradient_loss
from opd.objectives import register
from opd.types import Metric, Reduce, RolloutBatch, Signal, StudentOutputs, TeacherScores, TokenLoss


@dataclass(frozen=True, kw_only=True, slots=True)
class PolicyGradientSettings:
    is_cap: float = 5.0
    clip_eps: float | None = None


def policy_gradient_token_loss(
    advantages: torch.Tensor,  # [N, T], detached inside
    student: StudentOutputs,
    batch: RolloutBatch,
    settings: PolicyGradientSettings,
) -> TokenLoss:
    """Shared by every PG objective: the IS-corrected loss on student-sampled tokens, with its metrics."""
    mask = batch.response_mask & ~batch.from_teacher
    loss, weight = policy_gradient_loss(
        student.logprobs, batch.sampler_logprobs, advantages, is_cap=settings.is_cap, clip_eps=settings.clip_eps
    )
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    count = float(mask.sum())
    truncated = (torch.exp(student.logprobs.detach() - batch.sampler_logprobs) > settings.is_cap) & mask
    selected = advantages.detach()[mask]
    metrics = {
        "pg/advantage_mean": Metric(value=masked_mean(advantages.detach(), mask), weight=count),
        "pg/advantage_std": Metric(value=float(selected.std()) if selected.numel() > 1 else 0.0, weight=count),
        "pg/is_weight_mean": Metric(value=masked_mean(weight, mask), weight=count),
        "pg/is_truncated_fraction": Metric(value=masked_mean(truncated.float(), mask), weight=count),
        "pg/loss_tokens": Metric(value=count, reduce=Reduce.SUM),
    }
    return TokenLoss(per_token=loss, mask=mask, metrics=metrics)


@register("gopd")
@dataclass(frozen=True, kw_only=True, slots=True)
class GeneralizedOpd:
    """G-OPD: A = lam*(lT - lR) - (lS - lR), lam per row from its domain (ExOPD: lam > 1).

    Reward correction is this objective with the reference set to the teacher's pre-RL base.
    """

    settings: PolicyGradientSettings = PolicyGradientSettings()
    needs: frozenset[Signal] = frozenset({Signal.TEACHER_LOGPROBS, Signal.REF_LOGPROBS})

    @classmethod
    def from_config(cls, config) -> "GeneralizedOpd":
        return cls(settings=PolicyGradientSettings(is_cap=config.is_cap, clip_eps=config.clip_eps))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        lam = teacher.reward_scale[:, None]
        advantages = gopd_advantage(student.logprobs.detach(), teacher.logprobs, teacher.ref_logprobs, lam)
        return policy_gradient_token_loss(advantages, student, batch, self.settings)


@register("opd")
@dataclass(frozen=True, kw_only=True, slots=True)
class Opd:
    """Plain on-policy distillation (tinker): A = lT - lS, reverse KL with the sampled-token estimator."""

    settings: PolicyGradientSettings = PolicyGradientSettings()
    needs: frozenset[Signal] = frozenset({Signal.TEACHER_LOGPROBS})

    @classmethod
    def from_config(cls, config) -> "Opd":
        return cls(settings=PolicyGradientSettings(is_cap=config.is_cap, clip_eps=config.clip_eps))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        advantages = gopd_advantage(student.logprobs.detach(), teacher.logprobs)
        return policy_gradient_token_loss(advantages, student, batch, self.settings)
