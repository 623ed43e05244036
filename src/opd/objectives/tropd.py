"""TrOPD: trust-region on-policy distillation (Xing et al. 2026; ALGORITHMS.md §2).

Each student-sampled token is trusted with probability p_trust = min(pi_T / pi_S, 1) (speculative
decoding's acceptance test, detached), M ~ Bernoulli(p_trust) from noise fixed at rollout time. Trusted
tokens get the policy-gradient term with the configured advantage (`opd`, or `gopd` so TrOPD composes with
reward extrapolation); outliers get nothing (`mask`), a floored advantage (`clip`), or the top-k forward KL
toward the teacher (`fkl`, the paper's default). The region terms are summed per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.aggregate import masked_mean
from opd.functional import topk_forward_kl, trust_probability, trust_region_mask
from opd.objectives import register
from opd.objectives.pg import (
    PolicyGradientSettings,
    domain_advantage,
    policy_gradient_metrics,
    policy_gradient_terms,
    student_sampled,
)
from opd.types import Metric, RolloutBatch, Signal, StudentOutputs, TeacherScores, TokenLoss


@register("tropd")
@dataclass(frozen=True, kw_only=True, slots=True)
class TrustRegionOpd:
    settings: PolicyGradientSettings = PolicyGradientSettings()
    use_lam: bool = False  # advantage: gopd (True) or opd
    outlier: str = "fkl"  # mask | clip | fkl
    clip_floor: float = -3.0
    renormalize: bool = False

    @property
    def needs(self) -> frozenset[Signal]:
        # Top-k is always scored: the student's mass on the teacher's top-k is a TrOPD diagnostic.
        needs = {Signal.TEACHER_LOGPROBS, Signal.TEACHER_TOPK}
        return frozenset(needs | ({Signal.REF_LOGPROBS} if self.use_lam else set()))

    @classmethod
    def from_config(cls, config, temperature: float) -> "TrustRegionOpd":
        return cls(settings=PolicyGradientSettings.from_config(config), use_lam=config.advantage == "gopd",
                   outlier=config.outlier, clip_floor=config.clip_floor, renormalize=config.renormalize)

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        if batch.noise is None:
            raise ValueError("tropd needs RolloutBatch.noise (uniform draws fixed at rollout time)")
        sampled = student_sampled(batch)
        student_detached = student.logprobs.detach()
        trusted = trust_region_mask(student_detached, teacher.logprobs, noise=batch.noise) & sampled
        outliers = sampled & ~trusted
        advantages = domain_advantage(student, teacher, self.use_lam)
        pg_loss, weight = policy_gradient_terms(advantages, student, batch, self.settings)
        trust_loss = torch.where(trusted, pg_loss, torch.zeros_like(pg_loss))
        if self.outlier == "mask":
            outlier_loss = torch.zeros_like(pg_loss)
        elif self.outlier == "clip":
            floored = torch.clamp(teacher.logprobs - student_detached, min=self.clip_floor)
            clipped_loss, _ = policy_gradient_terms(floored, student, batch, self.settings)
            outlier_loss = torch.where(outliers, clipped_loss, torch.zeros_like(clipped_loss))
        else:
            fkl = topk_forward_kl(student.topk_logprobs, teacher.topk_logprobs, self.renormalize)
            outlier_loss = torch.where(outliers, fkl, torch.zeros_like(fkl))
        count = float(sampled.sum())
        metrics = policy_gradient_metrics("tropd", advantages, weight, trusted, self.settings)
        topk_mass = student.topk_logprobs.detach().exp().sum(dim=-1)
        metrics.update({
            "tropd/outlier_fraction": Metric(value=masked_mean(outliers.float(), sampled), weight=count),
            "tropd/p_trust_mean": Metric(value=masked_mean(trust_probability(student_detached, teacher.logprobs), sampled),
                                         weight=count),
            "tropd/trust_loss": Metric(value=masked_mean(trust_loss.detach(), trusted), weight=float(trusted.sum())),
            "tropd/outlier_loss": Metric(value=masked_mean(outlier_loss.detach(), outliers), weight=float(outliers.sum())),
            "tropd/student_topk_mass": Metric(value=masked_mean(topk_mass, sampled), weight=count),
        })
        return TokenLoss(per_token=trust_loss + outlier_loss, mask=sampled, metrics=metrics)
