"""Baselines the two papers compare against: eopd, reopold, entropy_opd, aopd, sft.

`eopd`, `reopold` and `aopd` are written from secondary sources (their primary texts were not read; see
research/papers.md §4): they are approximations of the published methods and say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opd.aggregate import masked_mean
from opd.functional import topk_forward_kl
from opd.objectives import register
from opd.objectives.pg import (
    PolicyGradientSettings,
    domain_advantage,
    masked_policy_gradient,
    policy_gradient_metrics,
    policy_gradient_terms,
    student_sampled,
)
from opd.types import Metric, RolloutBatch, Signal, StudentOutputs, TeacherScores, TokenLoss


def high_entropy_tokens(batch: RolloutBatch, fraction: float):
    """Tokens whose sampling entropy is in the top `fraction` of the whole optimizer batch."""
    if batch.entropy_rank is None:
        raise ValueError("entropy token selection needs RolloutBatch.entropy_rank (computed at rollout time)")
    return batch.entropy_rank >= 1.0 - fraction


@register("eopd")
@dataclass(frozen=True, kw_only=True, slots=True)
class EntropyGatedOpd:
    """EOPD (Jin et al. 2026), APPROXIMATE (secondary sources): opd + 1[H(pi_T) > tau] * top-k forward KL.

    The gate uses the teacher's entropy over its full vocabulary; sources report tau = 0.8 and k = 16
    (set objective.topk=16 to match).
    """

    threshold: float = 0.8
    renormalize: bool = False
    settings: PolicyGradientSettings = PolicyGradientSettings()
    needs: frozenset[Signal] = frozenset({Signal.TEACHER_LOGPROBS, Signal.TEACHER_TOPK, Signal.TEACHER_ENTROPY})

    @classmethod
    def from_config(cls, config, temperature: float) -> "EntropyGatedOpd":
        return cls(threshold=config.entropy_threshold, renormalize=config.renormalize,
                   settings=PolicyGradientSettings.from_config(config))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        mask = student_sampled(batch)
        pg = masked_policy_gradient("eopd", domain_advantage(student, teacher, False), mask, student, batch,
                                    self.settings)
        gate = (teacher.entropy > self.threshold) & mask
        fkl = topk_forward_kl(student.topk_logprobs, teacher.topk_logprobs, self.renormalize)
        loss = pg.per_token + torch.where(gate, fkl, torch.zeros_like(fkl))
        count = float(mask.sum())
        return TokenLoss(per_token=loss, mask=mask, metrics={
            **pg.metrics,
            "eopd/gated_fraction": Metric(value=masked_mean(gate.float(), mask), weight=count),
            "eopd/teacher_entropy": Metric(value=masked_mean(teacher.entropy, mask), weight=count),
        })


@register("reopold")
@dataclass(frozen=True, kw_only=True, slots=True)
class Reopold:
    """REOPOLD (Ko et al. 2026), APPROXIMATE (secondary sources).

    Policy gradient with the reward floored at log(r / (1 - r)) (r = 0.2 gives about -1.39); optionally only
    the highest-entropy tokens train (entropy_fraction); with a stage-two step, the floored reward trains
    every token before it and entropy selection takes over from it on (exploration, then refinement).
    """

    floor: float = math.log(0.2 / 0.8)
    entropy_selection: bool = False
    entropy_fraction: float = 0.2
    stage_two_step: int | None = None
    settings: PolicyGradientSettings = PolicyGradientSettings()
    needs: frozenset[Signal] = frozenset({Signal.TEACHER_LOGPROBS})

    @classmethod
    def from_config(cls, config, temperature: float) -> "Reopold":
        ratio = config.reopold_ratio
        return cls(floor=math.log(ratio / (1.0 - ratio)), entropy_selection=config.reopold_entropy_selection,
                   entropy_fraction=config.entropy_fraction, stage_two_step=config.reopold_stage_two_step,
                   settings=PolicyGradientSettings.from_config(config))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        mask = student_sampled(batch)
        in_stage_two = self.stage_two_step is not None and batch.step >= self.stage_two_step
        if self.entropy_selection or in_stage_two:
            mask = mask & high_entropy_tokens(batch, self.entropy_fraction)
        advantages = domain_advantage(student, teacher, False)
        if not in_stage_two:
            advantages = advantages.clamp(min=self.floor)
        result = masked_policy_gradient("reopold", advantages, mask, student, batch, self.settings)
        result.metrics["reopold/stage"] = Metric(value=2.0 if in_stage_two else 1.0)
        return result


@register("entropy_opd")
@dataclass(frozen=True, kw_only=True, slots=True)
class EntropyOpd:
    """OPD on the top `entropy_fraction` (20%) of the batch's tokens by student entropy (Wang et al. 2026).

    The selection is over the whole optimizer batch, ranked at rollout time (RolloutBatch.entropy_rank).
    """

    fraction: float = 0.2
    settings: PolicyGradientSettings = PolicyGradientSettings()
    needs: frozenset[Signal] = frozenset({Signal.TEACHER_LOGPROBS})

    @classmethod
    def from_config(cls, config, temperature: float) -> "EntropyOpd":
        return cls(fraction=config.entropy_fraction, settings=PolicyGradientSettings.from_config(config))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        sampled = student_sampled(batch)
        mask = sampled & high_entropy_tokens(batch, self.fraction)
        result = masked_policy_gradient("entropy_opd", domain_advantage(student, teacher, False), mask, student,
                                        batch, self.settings)
        result.metrics["entropy_opd/selected_fraction"] = Metric(value=masked_mean(mask.float(), sampled),
                                                                 weight=float(sampled.sum()))
        return TokenLoss(per_token=result.per_token, mask=sampled, metrics=result.metrics)


@register("aopd")
@dataclass(frozen=True, kw_only=True, slots=True)
class AsymmetricOpd:
    """AOPD (Jia et al. 2026), APPROXIMATE (abstract-level): the policy-gradient term where A = lT - lS > 0,
    and the top-k forward KL toward the teacher (a local divergence) where A <= 0.
    """

    renormalize: bool = False
    settings: PolicyGradientSettings = PolicyGradientSettings()
    needs: frozenset[Signal] = frozenset({Signal.TEACHER_LOGPROBS, Signal.TEACHER_TOPK})

    @classmethod
    def from_config(cls, config, temperature: float) -> "AsymmetricOpd":
        return cls(renormalize=config.renormalize, settings=PolicyGradientSettings.from_config(config))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        mask = student_sampled(batch)
        advantages = domain_advantage(student, teacher, False)
        positive = (advantages > 0) & mask
        pg_loss, weight = policy_gradient_terms(advantages, student, batch, self.settings)
        fkl = topk_forward_kl(student.topk_logprobs, teacher.topk_logprobs, self.renormalize)
        loss = torch.where(positive, pg_loss, torch.where(mask, fkl, torch.zeros_like(fkl)))
        metrics = policy_gradient_metrics("aopd", advantages, weight, positive, self.settings)
        metrics["aopd/positive_fraction"] = Metric(value=masked_mean(positive.float(), mask), weight=float(mask.sum()))
        return TokenLoss(per_token=loss, mask=mask, metrics=metrics)


@register("sft")
@dataclass(frozen=True, kw_only=True, slots=True)
class Sft:
    """Off-policy distillation: NLL of teacher-generated responses (rollouts come from the teacher, cached)."""

    needs: frozenset[Signal] = frozenset()

    @classmethod
    def from_config(cls, config, temperature: float) -> "Sft":
        return cls()

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        mask = batch.response_mask & batch.from_teacher
        loss = torch.where(mask, -student.logprobs, torch.zeros_like(student.logprobs))
        return TokenLoss(per_token=loss, mask=mask, metrics={
            "sft/nll": Metric(value=masked_mean(loss.detach(), mask), weight=float(mask.sum())),
        })
