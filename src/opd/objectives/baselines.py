"""Baselines the two papers compare against: eopd, reopold, entropy_opd, aopd, sft.

`eopd`, `reopold` and `aopd` are written from secondary sources (their primary texts were not read; see
research/papers.md §4): they are approximations of the published methods and say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from opd.functional import topk_forward_kl
from opd.objectives import BuildContext, options, register
from opd.objectives.pg import (
    PolicyGradientSettings,
    TeacherAdvantage,
    diagnostic,
    masked,
    masked_policy_gradient,
    mean_metric,
    policy_gradient_metrics,
    policy_gradient_terms,
    student_sampled,
)
from opd.types import Metric, RolloutBatch, Signal, StudentOutputs, TeacherScores, TokenLoss

_OPD_ADVANTAGE = TeacherAdvantage()  # every baseline here builds on plain OPD's A = lT - lS


def _fraction_problems(fraction: float, where: str) -> list[str]:
    return [] if 0 < fraction <= 1 else [f"{where}: must be in (0, 1]"]


@dataclass(frozen=True, kw_only=True, slots=True)
class EopdOptions:
    """objective.eopd"""

    entropy_threshold: float = 0.8  # top-k forward KL where the teacher's entropy exceeds this

    def problems(self, where: str) -> list[str]:
        return [] if self.entropy_threshold >= 0 else [f"{where}.entropy_threshold: must be >= 0 (an entropy)"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ReopoldOptions:
    """objective.reopold"""

    ratio: float = 0.2  # reward floor log(r / (1 - r))
    entropy_selection: bool = False  # train only the highest-entropy tokens (entropy_fraction)
    entropy_fraction: float = 0.2  # share of the batch's tokens, by the highest sampler entropy, that train
    stage_two_step: int | None = None  # from this step on, entropy selection replaces the floor

    def problems(self, where: str) -> list[str]:
        ratio = [] if 0 < self.ratio < 1 else [f"{where}.ratio: must be in (0, 1)"]
        return ratio + _fraction_problems(self.entropy_fraction, f"{where}.entropy_fraction")


@dataclass(frozen=True, kw_only=True, slots=True)
class EntropyOpdOptions:
    """objective.entropy_opd"""

    fraction: float = 0.2  # share of the batch's tokens, by the highest sampler entropy, that train

    def problems(self, where: str) -> list[str]:
        return _fraction_problems(self.fraction, f"{where}.fraction")


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

    entropy_threshold: float = 0.8
    renormalize: bool = False
    settings: PolicyGradientSettings = PolicyGradientSettings()
    needs: frozenset[Signal] = frozenset({Signal.TEACHER_LOGPROBS, Signal.TEACHER_TOPK, Signal.TEACHER_ENTROPY})
    uses_lam: ClassVar[bool] = False
    takes_dataset_responses: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config, context: BuildContext) -> "EntropyGatedOpd":
        return cls(**options(config.eopd), renormalize=config.renormalize,
                   settings=PolicyGradientSettings.from_config(config))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        mask = student_sampled(batch)
        pg = masked_policy_gradient("eopd", _OPD_ADVANTAGE(student, batch, teacher), mask, student, batch,
                                    self.settings)
        gate = (teacher.entropy > self.entropy_threshold) & mask
        fkl = topk_forward_kl(student.topk_logprobs, teacher.topk_logprobs, self.renormalize)
        loss = pg.per_token + masked(fkl, gate)
        return TokenLoss(per_token=loss, mask=mask, metrics={
            **pg.metrics,
            "eopd/gated_fraction": mean_metric(gate.float(), mask),
            "eopd/teacher_entropy": mean_metric(teacher.entropy, mask),
        }, diagnostics=pg.diagnostics)


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
    uses_lam: ClassVar[bool] = False
    takes_dataset_responses: ClassVar[bool] = False

    @property
    def needs(self) -> frozenset[Signal]:
        selects = self.entropy_selection or self.stage_two_step is not None
        return frozenset({Signal.TEACHER_LOGPROBS} | ({Signal.SAMPLER_ENTROPY} if selects else set()))

    @classmethod
    def from_config(cls, config, context: BuildContext) -> "Reopold":
        block = config.reopold
        return cls(floor=math.log(block.ratio / (1.0 - block.ratio)), entropy_selection=block.entropy_selection,
                   entropy_fraction=block.entropy_fraction, stage_two_step=block.stage_two_step,
                   settings=PolicyGradientSettings.from_config(config))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        mask = student_sampled(batch)
        in_stage_two = self.stage_two_step is not None and batch.step >= self.stage_two_step
        if self.entropy_selection or in_stage_two:
            mask = mask & high_entropy_tokens(batch, self.entropy_fraction)
        advantages = _OPD_ADVANTAGE(student, batch, teacher)
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
    needs: frozenset[Signal] = frozenset({Signal.TEACHER_LOGPROBS, Signal.SAMPLER_ENTROPY})
    uses_lam: ClassVar[bool] = False
    takes_dataset_responses: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config, context: BuildContext) -> "EntropyOpd":
        return cls(**options(config.entropy_opd), settings=PolicyGradientSettings.from_config(config))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        sampled = student_sampled(batch)
        mask = sampled & high_entropy_tokens(batch, self.fraction)
        result = masked_policy_gradient("entropy_opd", _OPD_ADVANTAGE(student, batch, teacher), mask, student,
                                        batch, self.settings)
        result.metrics["entropy_opd/selected_fraction"] = mean_metric(mask.float(), sampled)
        return TokenLoss(per_token=result.per_token, mask=sampled, metrics=result.metrics,
                         diagnostics=result.diagnostics)


@register("aopd")
@dataclass(frozen=True, kw_only=True, slots=True)
class AsymmetricOpd:
    """AOPD (Jia et al. 2026), APPROXIMATE (abstract-level): the policy-gradient term where A = lT - lS > 0,
    and the top-k forward KL toward the teacher (a local divergence) where A <= 0.
    """

    renormalize: bool = False
    settings: PolicyGradientSettings = PolicyGradientSettings()
    needs: frozenset[Signal] = frozenset({Signal.TEACHER_LOGPROBS, Signal.TEACHER_TOPK})
    uses_lam: ClassVar[bool] = False
    takes_dataset_responses: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config, context: BuildContext) -> "AsymmetricOpd":
        return cls(renormalize=config.renormalize, settings=PolicyGradientSettings.from_config(config))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        mask = student_sampled(batch)
        advantages = _OPD_ADVANTAGE(student, batch, teacher)
        positive = (advantages > 0) & mask
        pg_loss, weight = policy_gradient_terms(advantages, student, batch, self.settings)
        fkl = topk_forward_kl(student.topk_logprobs, teacher.topk_logprobs, self.renormalize)
        loss = torch.where(positive, pg_loss, masked(fkl, mask))
        metrics = policy_gradient_metrics("aopd", advantages, weight, positive, self.settings)
        metrics["aopd/positive_fraction"] = mean_metric(positive.float(), mask)
        return TokenLoss(per_token=loss, mask=mask, metrics=metrics,
                         diagnostics={"advantage": diagnostic(advantages, positive)})


@register("sft")
@dataclass(frozen=True, kw_only=True, slots=True)
class Sft:
    """Off-policy distillation: NLL of teacher-generated responses (rollouts come from the teacher, cached)."""

    needs: frozenset[Signal] = frozenset({Signal.TEACHER_RESPONSES})
    uses_lam: ClassVar[bool] = False
    takes_dataset_responses: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config, context: BuildContext) -> "Sft":
        return cls()

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        mask = batch.response_mask & batch.from_teacher
        loss = masked(-student.logprobs, mask)
        return TokenLoss(per_token=loss, mask=mask, metrics={"sft/nll": mean_metric(loss.detach(), mask)})
