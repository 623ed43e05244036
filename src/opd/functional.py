"""Pure per-token tensor functions: opd's math for use inside any other framework.

Nothing here reduces over tokens unless its name says so (`aggregate`). Log-prob names map to
docs/algorithms.md: student_logprobs = lS, teacher_logprobs = lT, ref_logprobs = lR, sampler_logprobs = lOld.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from opd.aggregate import aggregate

__all__ = [
    "aggregate",
    "generalized_jsd",
    "gopd_advantage",
    "grpo_advantages",
    "kl_estimate",
    "policy_gradient_loss",
    "topk_forward_kl",
    "trust_probability",
    "trust_region_mask",
]


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
    the gradient of a token whose ratio exceeds the cap (ours; algorithms §1 leaves the gradient of the
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


def trust_probability(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """TrOPD's p_trust = min(pi_T / pi_S, 1) of a student-sampled token (speculative decoding's acceptance)."""
    return torch.exp((teacher_logprobs - student_logprobs).clamp(max=0.0)).detach()


def trust_region_mask(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    generator: torch.Generator | None = None,
    *,
    noise: Tensor | None = None,
) -> Tensor:
    """TrOPD's partition: M ~ Bernoulli(min(pi_T / pi_S, 1)); True = trust region, False = outlier.

    The draw is `noise < p_trust` with uniform noise from `generator` (or given, e.g. fixed at rollout time),
    so identical seeds give identical masks.
    """
    probability = trust_probability(student_logprobs, teacher_logprobs)
    if noise is None:
        noise = torch.rand(probability.shape, generator=generator, dtype=probability.dtype,
                           device=probability.device)
    return noise < probability


# The student's leftover mass outside the teacher's top-k is floored here before its log (tail_bucket): a
# student with all its mass on the top-k would otherwise give log 0 and an infinite gradient.
TAIL_MASS_FLOOR = 1e-10


def topk_forward_kl(student_topk_logprobs: Tensor, teacher_topk_logprobs: Tensor, renormalize: bool = False,
                    tail_bucket: bool = False) -> Tensor:
    """Forward KL toward the teacher over its top-k tokens, per position: sum_v p_T(v) (lT_v - lS_v).

    By default the teacher's probabilities are not renormalised over the top-k (algorithms §2): the term is
    the top-k part of the full forward KL. renormalize=True uses q = softmax(lT_topk) and sum_v q(v)(log q(v) - lS_v).
    tail_bucket=True adds the rest of the vocabulary as one category: + t_T (log t_T - log t_S), with
    t_T = 1 - sum_v p_T(v) and t_S = 1 - sum_v p_S(v) over the teacher's top-k (a KL over K + 1 categories).
    The last dimension is K. Gradients flow into student_topk_logprobs only.
    """
    if renormalize and tail_bucket:
        raise ValueError("topk_forward_kl: a renormalised teacher has no tail; choose renormalize or tail_bucket")
    teacher = teacher_topk_logprobs.detach()
    if renormalize:
        teacher = torch.log_softmax(teacher, dim=-1)
    loss = (teacher.exp() * (teacher - student_topk_logprobs)).sum(dim=-1)
    if not tail_bucket:
        return loss
    teacher_tail = log_tail_mass(teacher)
    student_tail = log_tail_mass(student_topk_logprobs, floor=TAIL_MASS_FLOOR)
    # 0 log 0 = 0: a teacher whose top-k holds all its mass adds nothing (and no NaN through exp(-inf) * inf).
    tail = torch.where(teacher_tail > -math.inf, teacher_tail.exp() * (teacher_tail - student_tail), 0.0)
    return loss + tail


def log_tail_mass(topk_logprobs: Tensor, floor: float = 0.0) -> Tensor:
    """log(1 - sum_k exp(l_k)) over the last dimension, stably (log1mexp of the log-sum-exp), the mass
    floored at `floor` (0: -inf when the top-k holds all the mass, rounding included)."""
    inside = torch.logsumexp(topk_logprobs, dim=-1).clamp(max=math.log1p(-floor))
    # Maechler's log1mexp: expm1 near 0, log1p(-exp) further out, each where it keeps its precision. Each
    # branch reads a clamped copy, so the branch torch.where drops has a finite gradient (0, not NaN).
    near = torch.log(-torch.expm1(inside.clamp(min=-math.log(2.0))))
    far = torch.log1p(-torch.exp(inside.clamp(max=-math.log(2.0))))
    return torch.where(inside > -math.log(2.0), near, far)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float = 1.0) -> Tensor:
    """Generalized Jensen-Shannon divergence per position over the full vocabulary (last dimension), as TRL.

    M = beta p_T + (1 - beta) p_S; JSD = beta KL(p_T || M) + (1 - beta) KL(p_S || M). The end points are the
    plain KLs rather than the (vanishing) limits: beta = 0 is forward KL(p_T || p_S), beta = 1 is reverse
    KL(p_S || p_T). Teacher logits are detached.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    student = torch.log_softmax(student_logits / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    if beta == 0.0:
        return (teacher.exp() * (teacher - student)).sum(dim=-1)
    if beta == 1.0:
        return (student.exp() * (student - teacher)).sum(dim=-1)
    mixture = torch.logaddexp(teacher + math.log(beta), student + math.log1p(-beta))
    to_teacher = (teacher.exp() * (teacher - mixture)).sum(dim=-1)
    to_student = (student.exp() * (student - mixture)).sum(dim=-1)
    return beta * to_teacher + (1.0 - beta) * to_student


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """(r_i - mean_group(r)) / (std_group(r) + eps) for consecutive groups of `group_size` rewards.

    std is the unbiased sample standard deviation (as TRL and verl); a group of one has advantage 0.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"grpo_advantages: {rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.reshape(-1, group_size).to(torch.float64)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if group_size == 1:
        return torch.zeros_like(rewards)
    return (centred / (groups.std(dim=1, keepdim=True) + eps)).reshape(rewards.shape).to(rewards.dtype)


def _all_equal_one(lam: float | Tensor) -> bool:
    if isinstance(lam, Tensor):
        return bool((lam == 1.0).all())
    return lam == 1.0
