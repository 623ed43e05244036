"""Pure per-token tensor functions: opd's math for use inside any other framework.

Nothing here reduces over tokens unless its name says so (`aggregate`). Log-prob names map to
ALGORITHMS.md: student_logprobs = lS, teacher_logprobs = lT, ref_logprobs = lR, sampler_logprobs = lOld.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from opd.aggregate import aggregate

__all__ = ["aggregate", "gopd_advantage", "kl_estimate", "policy_gradient_loss"]


def gopd_advantage(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    ref_logprobs: Tensor | None = None,
    lam: float | Tensor = 1.0,
) -> Tensor:
    """G-OPD per-token advantage `lam*(lT - lR) - (lS - lR)` = `(lT - lS) + (lam - 1)*(lT - lR)`.

    lam = 1 is plain OPD (`lT - lS`, the reference cancels); lam > 1 is ExOPD. `lam` may be a tensor that
    broadcasts against the log-probs (e.g. [N, 1] for one reward scale per row). The result carries the
    gradient of student_logprobs; as a policy-gradient advantage it must be detached by the caller.
    lam != 1 without a reference is an error: the reward would silently become plain OPD.
    """
    opd = teacher_logprobs - student_logprobs
    if ref_logprobs is None:
        if not _all_equal_one(lam):
            raise ValueError("gopd_advantage: lam != 1 needs ref_logprobs (the reward is lam*(lT - lR))")
        return opd
    return opd + (lam - 1.0) * (teacher_logprobs - ref_logprobs)


def kl_estimate(student_logprobs: Tensor, teacher_logprobs: Tensor, kind: Literal["k1", "k2", "k3"]) -> Tensor:
    """Single-sample estimates of KL(pi_S || pi_T) from tokens sampled by the student.

    k1 = lS - lT (unbiased, high variance, can be negative); k2 = (lS - lT)^2 / 2;
    k3 = exp(lT - lS) - (lT - lS) - 1 (unbiased, always >= 0).
    """
    log_ratio = teacher_logprobs - student_logprobs
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; valid: ['k1', 'k2', 'k3']")


def policy_gradient_loss(
    student_logprobs: Tensor,
    sampler_logprobs: Tensor,
    advantages: Tensor,
    *,
    is_cap: float = 5.0,
    clip_eps: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token policy-gradient loss with an importance-sampling correction; returns (loss, IS weight).

    Default (truncated IS): loss = -sg(min(r, is_cap)) * exp(lS - sg(lS)) * sg(A), r = exp(lS - lOld).
    Its value is -min(r, is_cap)*A and its gradient -min(r, is_cap)*A*grad(lS): a truncated weight keeps
    the gradient of a token whose ratio exceeds the cap (ours; ALGORITHMS §1 leaves the gradient of the
    truncated ratio open). With clip_eps (PPO): loss = -min(r*A, clip(r, 1-eps, 1+eps)*A), r with gradient.
    The returned IS weight is detached.
    """
    advantages = advantages.detach()
    log_ratio = student_logprobs - sampler_logprobs
    if clip_eps is not None:
        ratio = torch.exp(log_ratio)
        clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
        loss = -torch.minimum(ratio * advantages, clipped * advantages)
        return loss, ratio.detach()
    weight = torch.exp(log_ratio.detach()).clamp(max=is_cap)
    # exp(x - sg(x)) is 1 in value and has the gradient of x: a REINFORCE term whose value is the loss.
    unit = torch.exp(student_logprobs - student_logprobs.detach())
    return -weight * unit * advantages, weight


def _all_equal_one(lam: float | Tensor) -> bool:
    if isinstance(lam, Tensor):
        return bool((lam == 1.0).all())
    return lam == 1.0
