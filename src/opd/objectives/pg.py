"""The policy-gradient family (algorithms §1): one objective, `PolicyGradient`, parameterised by its
advantage, serves `opd` (A = lT - lS), `gopd` (ExOPD, reward correction) and `grpo`.

Every student-sampled token gets the dense advantage A_t (discount 0) and the loss -w_t * ratio_t * sg(A_t)
of `functional.policy_gradient_loss`. Tokens copied from a teacher prefix never get a policy-gradient term
(algorithms §3): `student_sampled` leaves them out. The helpers here are shared by every objective that
has a policy-gradient part (tropd, reopold, entropy_opd, aopd, eopd, jsd_topk).

GRPO (Shao et al. 2024) trains the domain teachers (G-OPD §4) and is addable to any objective with a weight.
Its advantages are normalised within each prompt's group over the whole batch before micro-batching
(RolloutBatch.group_advantages), so the gradient does not depend on how the batch is cut. No KL term (the
G-OPD teachers use KL 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Protocol

import torch
from torch import Tensor

from opd.aggregate import masked_mean
from opd.functional import gopd_advantage, policy_gradient_loss
from opd.objectives import BuildContext, register_builder
from opd.types import Metric, Reduce, RolloutBatch, Signal, StudentOutputs, TeacherScores, TokenLoss


@dataclass(frozen=True, kw_only=True, slots=True)
class PolicyGradientSettings:
    is_cap: float = 5.0
    clip_eps: float | None = None

    @classmethod
    def from_config(cls, config) -> "PolicyGradientSettings":
        return cls(is_cap=config.is_cap, clip_eps=config.clip_eps)


def masked(values: Tensor, mask: Tensor) -> Tensor:
    """`values` where `mask`, exact zeros elsewhere."""
    return torch.where(mask, values, torch.zeros_like(values))


def mean_metric(values: Tensor, mask: Tensor) -> Metric:
    """The mean of `values` over `mask`, weighted by the number of tokens it averages."""
    return Metric(value=masked_mean(values, mask), weight=float(mask.sum()))


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
        # the largest weight is how far the sampler (a stale one with rollout.async) is from the student
        f"{area}/is_weight_max": Metric(value=float(weight.detach()[mask].max()) if count else 0.0,
                                        reduce=Reduce.MAX),
        f"{area}/is_truncated_fraction": Metric(value=masked_mean((weight >= settings.is_cap).float(), mask),
                                                weight=count),
        f"{area}/tokens": Metric(value=count, reduce=Reduce.SUM),
    }


def diagnostic(values: Tensor, mask: Tensor) -> Tensor:  # [N, T] float32
    """Detached `values` where `mask`, nan elsewhere: one TokenLoss.diagnostics entry."""
    return torch.where(mask, values.detach().float(), torch.full_like(values, math.nan, dtype=torch.float32))


def masked_policy_gradient(area: str, advantages: Tensor, mask: Tensor, student: StudentOutputs, batch: RolloutBatch,
                           settings: PolicyGradientSettings) -> TokenLoss:
    """The PG loss on `mask` tokens only, with its metrics and the advantage of those tokens."""
    loss, weight = policy_gradient_terms(advantages, student, batch, settings)
    return TokenLoss(per_token=masked(loss, mask), mask=mask,
                     metrics=policy_gradient_metrics(area, advantages, weight, mask, settings),
                     diagnostics={"advantage": diagnostic(advantages, mask)})


# --------------------------------------------------------------------------- advantages


class Advantage(Protocol):
    needs: frozenset[Signal]
    uses_lam: bool

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> Tensor: ...  # [N, T]


@dataclass(frozen=True, kw_only=True, slots=True)
class TeacherAdvantage:
    """A = lT - lS: plain OPD's reward (the reverse KL's sampled-token estimator)."""

    needs: ClassVar[frozenset[Signal]] = frozenset({Signal.TEACHER_LOGPROBS})
    uses_lam: ClassVar[bool] = False

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> Tensor:
        return gopd_advantage(student.logprobs.detach(), teacher.logprobs)


@dataclass(frozen=True, kw_only=True, slots=True)
class GeneralizedAdvantage:
    """G-OPD: A = lam*(lT - lR) - (lS - lR), lam of each row's domain (ExOPD: lam > 1)."""

    lam_by_domain: Mapping[str, float] = field(default_factory=dict)
    needs: ClassVar[frozenset[Signal]] = frozenset({Signal.TEACHER_LOGPROBS, Signal.REF_LOGPROBS})
    uses_lam: ClassVar[bool] = True

    def lam(self, batch: RolloutBatch, device: torch.device) -> Tensor:  # [N, 1] float32
        missing = sorted(set(batch.domain) - set(self.lam_by_domain))
        if missing:
            raise ValueError(f"gopd advantage: no lam for domain(s) {missing}; lam_by_domain has "
                             f"{sorted(self.lam_by_domain)}")
        return torch.tensor([self.lam_by_domain[d] for d in batch.domain], dtype=torch.float32, device=device)[:, None]

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> Tensor:
        lam = self.lam(batch, teacher.logprobs.device)
        return gopd_advantage(student.logprobs.detach(), teacher.logprobs, teacher.ref_logprobs, lam)


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupAdvantage:
    """GRPO: each response's outcome reward, normalised within its prompt's group, on all its tokens."""

    needs: ClassVar[frozenset[Signal]] = frozenset({Signal.REWARD})
    uses_lam: ClassVar[bool] = False

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> Tensor:
        if batch.group_advantages is None:
            raise ValueError("grpo needs RolloutBatch.group_advantages (graded rewards)")
        return batch.group_advantages[:, None].expand_as(student.logprobs)


# --------------------------------------------------------------------------- the objective


@dataclass(frozen=True, kw_only=True, slots=True)
class PolicyGradient:
    """The policy-gradient loss on every student-sampled token with `advantage`; metrics under `area`/."""

    area: str
    advantage: Advantage
    settings: PolicyGradientSettings = PolicyGradientSettings()
    takes_dataset_responses: ClassVar[bool] = False  # dataset responses have no sampler log-probs

    @property
    def needs(self) -> frozenset[Signal]:
        return self.advantage.needs

    @property
    def uses_lam(self) -> bool:
        return self.advantage.uses_lam

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        advantages = self.advantage(student, batch, teacher)
        result = masked_policy_gradient(self.area, advantages, student_sampled(batch), student, batch, self.settings)
        if Signal.REWARD in self.needs:
            result.metrics[f"{self.area}/reward_mean"] = Metric(value=float(batch.rewards.mean()),
                                                                weight=float(batch.num_rows))
        return result


def advantage_named(name: str, context: BuildContext) -> Advantage:
    """The advantage an objective option names: `opd` (lT - lS) or `gopd` (with each domain's lam)."""
    if name == "gopd":
        return GeneralizedAdvantage(lam_by_domain=context.lam_by_domain)
    if name == "opd":
        return TeacherAdvantage()
    raise ValueError(f"unknown advantage {name!r}; choose opd or gopd")


# Plain OPD (tinker); G-OPD, of which reward correction is the case reference = the teacher's pre-RL base;
# GRPO with group-normalised grader rewards.
register_builder("opd", lambda config, context: PolicyGradient(
    area="opd", advantage=TeacherAdvantage(), settings=PolicyGradientSettings.from_config(config)))
register_builder("gopd", lambda config, context: PolicyGradient(
    area="gopd", advantage=advantage_named("gopd", context), settings=PolicyGradientSettings.from_config(config)))
register_builder("grpo", lambda config, context: PolicyGradient(
    area="grpo", advantage=GroupAdvantage(), settings=PolicyGradientSettings.from_config(config)))
