"""TrOPD: trust-region on-policy distillation (Xing et al. 2026; algorithms §2).

Each student-sampled token is trusted with probability p_trust = min(pi_T / pi_S, 1) (speculative
decoding's acceptance test, detached), M ~ Bernoulli(p_trust) from noise fixed at rollout time. Trusted
tokens get the policy-gradient term with the configured advantage (`opd`, or `gopd` so TrOPD composes with
reward extrapolation); outliers get nothing (`mask`), a floored advantage (`clip`), or the top-k forward KL
toward the teacher (`fkl`, the paper's default). The region terms are summed per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from opd.functional import topk_forward_kl, trust_probability, trust_region_mask
from opd.objectives import BuildContext, register
from opd.objectives.pg import (
    Advantage,
    PolicyGradientSettings,
    TeacherAdvantage,
    advantage_named,
    diagnostic,
    masked,
    mean_metric,
    policy_gradient_metrics,
    policy_gradient_terms,
    student_sampled,
)
from opd.types import RolloutBatch, Signal, StudentOutputs, TeacherScores, TokenLoss


@dataclass(frozen=True, kw_only=True, slots=True)
class TropdOptions:
    """objective.tropd"""

    advantage: Literal["opd", "gopd"] = "opd"  # the trust region's advantage (gopd: TrOPD x ExOPD)
    outlier: Literal["mask", "clip", "fkl"] = "fkl"
    clip_floor: float = -3.0  # tau of outlier=clip: A = max(lT - lS, tau); ours, the paper does not report it

    def problems(self, where: str) -> list[str]:
        # Outliers are tokens the teacher finds far less likely (lT - lS < 0): a floor >= 0 would give them
        # all a non-negative advantage (0 is outlier: mask).
        return [] if self.clip_floor < 0 else [f"{where}.clip_floor: must be < 0, got {self.clip_floor}"]


@register("tropd")
@dataclass(frozen=True, kw_only=True, slots=True)
class TrustRegionOpd:
    settings: PolicyGradientSettings = PolicyGradientSettings()
    advantage: Advantage = TeacherAdvantage()  # of trusted tokens: opd, or gopd (each domain's lam)
    outlier: str = "fkl"  # mask | clip | fkl
    clip_floor: float = -3.0
    renormalize: bool = False
    takes_dataset_responses: ClassVar[bool] = False

    @property
    def needs(self) -> frozenset[Signal]:
        # Top-k is always scored: the student's mass on the teacher's top-k is a TrOPD diagnostic.
        return frozenset({Signal.TEACHER_LOGPROBS, Signal.TEACHER_TOPK}) | self.advantage.needs

    @property
    def uses_lam(self) -> bool:
        return self.advantage.uses_lam

    @classmethod
    def from_config(cls, config, context: BuildContext) -> "TrustRegionOpd":
        block = config.tropd
        return cls(settings=PolicyGradientSettings.from_config(config),
                   advantage=advantage_named(block.advantage, context), outlier=block.outlier,
                   clip_floor=block.clip_floor, renormalize=config.renormalize)

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        if batch.noise is None:
            raise ValueError("tropd needs RolloutBatch.noise (uniform draws fixed at rollout time)")
        sampled = student_sampled(batch)
        student_detached = student.logprobs.detach()
        trusted = trust_region_mask(student_detached, teacher.logprobs, noise=batch.noise) & sampled
        outliers = sampled & ~trusted
        advantages = self.advantage(student, batch, teacher)
        pg_loss, weight = policy_gradient_terms(advantages, student, batch, self.settings)
        trust_loss = masked(pg_loss, trusted)
        if self.outlier == "mask":
            outlier_loss = torch.zeros_like(pg_loss)
        elif self.outlier == "clip":
            floored = torch.clamp(teacher.logprobs - student_detached, min=self.clip_floor)
            clipped_loss, _ = policy_gradient_terms(floored, student, batch, self.settings)
            outlier_loss = masked(clipped_loss, outliers)
        else:
            fkl = topk_forward_kl(student.topk_logprobs, teacher.topk_logprobs, self.renormalize)
            outlier_loss = masked(fkl, outliers)
        metrics = policy_gradient_metrics("tropd", advantages, weight, trusted, self.settings)
        p_trust = trust_probability(student_detached, teacher.logprobs)
        topk_mass = student.topk_logprobs.detach().exp().sum(dim=-1)
        metrics.update({
            "tropd/outlier_fraction": mean_metric(outliers.float(), sampled),
            "tropd/p_trust_mean": mean_metric(p_trust, sampled),
            "tropd/trust_loss": mean_metric(trust_loss.detach(), trusted),
            "tropd/outlier_loss": mean_metric(outlier_loss.detach(), outliers),
            "tropd/student_topk_mass": mean_metric(topk_mass, sampled),
        })
        # The advantage each token's PG term used: trusted tokens', and the floored one of `clip`'s outliers.
        used, with_advantage = advantages, trusted
        if self.outlier == "clip":
            used, with_advantage = torch.where(trusted, advantages, floored), sampled
        diagnostics = {
            "advantage": diagnostic(used, with_advantage),
            "trust_probability": diagnostic(p_trust, sampled),
            "outlier": diagnostic(outliers.float(), sampled),
        }
        return TokenLoss(per_token=trust_loss + outlier_loss, mask=sampled, metrics=metrics, diagnostics=diagnostics)
