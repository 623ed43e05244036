"""opd.functional against independent float64 references written from docs/algorithms.md, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from opd.functional import aggregate, gopd_advantage, kl_estimate, policy_gradient_loss

SHAPES = [(1, 1), (3, 5), (4, 17)]


def random_logprobs(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return -torch.rand(shape, generator=generator, dtype=torch.float64) * 5


def random_mask(shape, seed, empty_row=True):
    generator = torch.Generator().manual_seed(seed + 100)
    mask = torch.rand(shape, generator=generator) > 0.3
    if empty_row and shape[0] > 1:
        mask[1] = False  # a row with no loss tokens
    return mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 1.25, 1.5])
def test_gopd_advantage_matches_formula(shape, lam):
    student = random_logprobs(shape, 0).requires_grad_()
    teacher = random_logprobs(shape, 1)
    reference = random_logprobs(shape, 2)
    advantage = gopd_advantage(student, teacher, reference, lam)
    # Reference: the paper's form lam*(lT - lR) - (lS - lR), element by element.
    expected = torch.tensor([[lam * (t - r) - (s - r) for s, t, r in zip(srow, trow, rrow)]
                             for srow, trow, rrow in zip(student.tolist(), teacher.tolist(), reference.tolist())],
                            dtype=torch.float64)
    torch.testing.assert_close(advantage, expected)
    advantage.sum().backward()
    torch.testing.assert_close(student.grad, -torch.ones(shape, dtype=torch.float64))  # dA/dlS = -1


def test_gopd_advantage_per_row_lam_and_opd_limit():
    student, teacher, reference = (random_logprobs((3, 4), s) for s in range(3))
    lam = torch.tensor([[1.0], [1.25], [0.5]], dtype=torch.float64)
    advantage = gopd_advantage(student, teacher, reference, lam)
    for row, value in enumerate([1.0, 1.25, 0.5]):
        torch.testing.assert_close(advantage[row], gopd_advantage(student[row], teacher[row], reference[row], value))
    # lam = 1 is plain OPD: the reference cancels.
    torch.testing.assert_close(gopd_advantage(student, teacher, reference, 1.0), teacher - student)
    torch.testing.assert_close(gopd_advantage(student, teacher), teacher - student)


def test_gopd_advantage_refuses_lam_without_reference():
    student, teacher = random_logprobs((2, 3), 0), random_logprobs((2, 3), 1)
    with pytest.raises(ValueError, match="lam != 1 needs ref_logprobs"):
        gopd_advantage(student, teacher, None, 1.25)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate_matches_formula_and_gradient(kind):
    student = random_logprobs((4, 6), 0).requires_grad_()
    teacher = random_logprobs((4, 6), 1).requires_grad_()
    value = kl_estimate(student, teacher, kind)
    s, t = student.detach(), teacher.detach()
    formula = {"k1": s - t, "k2": 0.5 * (s - t) ** 2, "k3": torch.exp(t - s) - (t - s) - 1}[kind]
    torch.testing.assert_close(value, formula)
    value.sum().backward()
    grad_student = {"k1": torch.ones_like(s), "k2": s - t, "k3": -torch.exp(t - s) + 1}[kind]
    torch.testing.assert_close(student.grad, grad_student)
    torch.testing.assert_close(teacher.grad, -grad_student)


def test_kl_estimators_are_unbiased_for_the_true_kl():
    """E_{y~pS}[k1] = E[k3] = KL(pS || pT) on a categorical: exact expectation over the vocabulary."""
    generator = torch.Generator().manual_seed(0)
    log_student = torch.log_softmax(torch.randn(50, generator=generator, dtype=torch.float64), 0)
    log_teacher = torch.log_softmax(torch.randn(50, generator=generator, dtype=torch.float64), 0)
    true_kl = (log_student.exp() * (log_student - log_teacher)).sum()
    for kind in ("k1", "k3"):
        expected = (log_student.exp() * kl_estimate(log_student, log_teacher, kind)).sum()
        torch.testing.assert_close(expected, true_kl)
    assert (kl_estimate(log_student, log_teacher, "k3") >= 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(log_student, log_teacher, "k4")


def reference_aggregate(loss, mask, mode, denominator=None):
    rows = []
    for loss_row, mask_row in zip(loss, mask):
        selected = [l for l, m in zip(loss_row, mask_row) if m]
        rows.append(selected)
    if mode == "token-sum":
        return sum(sum(r) for r in rows)
    if mode == "token-mean":
        count = sum(len(r) for r in rows) if denominator is None else denominator
        return sum(sum(r) for r in rows) / max(count, 1)
    means = [sum(r) / len(r) for r in rows if r]
    count = len(means) if denominator is None else denominator
    return sum(means) / max(count, 1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "token-sum"])
def test_aggregate_matches_reference_values_and_gradients(shape, mode):
    loss = random_logprobs(shape, 3).requires_grad_()
    mask = random_mask(shape, 4)
    value = aggregate(loss, mask, mode)
    expected = reference_aggregate(loss, mask, mode)
    torch.testing.assert_close(value, expected if torch.is_tensor(expected) else torch.tensor(expected, dtype=torch.float64))
    value.backward()
    reference_loss = loss.detach().clone().requires_grad_()
    expected = reference_aggregate(reference_loss, mask, mode)
    if torch.is_tensor(expected):
        expected.backward()
        torch.testing.assert_close(loss.grad, reference_loss.grad)
    else:  # nothing selected: no gradient anywhere
        assert torch.count_nonzero(loss.grad) == 0


def test_aggregate_with_global_denominator_sums_to_the_whole_batch():
    loss, mask = random_logprobs((8, 5), 0), random_mask((8, 5), 1)
    for mode in ("token-mean", "seq-mean-token-mean", "token-sum"):
        whole = aggregate(loss, mask, mode)
        denominator = {"token-mean": int(mask.sum()), "seq-mean-token-mean": int(mask.any(1).sum()), "token-sum": None}[mode]
        parts = sum(aggregate(loss[i : i + 2], mask[i : i + 2], mode, denominator) for i in range(0, 8, 2))
        torch.testing.assert_close(parts, whole)


def test_aggregate_empty_mask_is_zero_not_nan():
    loss = random_logprobs((2, 3), 0).requires_grad_()
    for mode in ("token-mean", "seq-mean-token-mean", "token-sum"):
        value = aggregate(loss, torch.zeros(2, 3, dtype=torch.bool), mode)
        assert value.item() == 0.0
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        aggregate(loss, torch.ones(2, 3, dtype=torch.bool), "mean")


def test_policy_gradient_loss_truncated_is_value_and_gradient():
    student = random_logprobs((3, 4), 0).requires_grad_()
    sampler = random_logprobs((3, 4), 1)
    advantage = random_logprobs((3, 4), 2) + 2.5
    loss, weight = policy_gradient_loss(student, sampler, advantage, is_cap=2.0)
    ratio = torch.exp(student.detach() - sampler)
    expected_weight = torch.minimum(ratio, torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(weight, expected_weight)
    torch.testing.assert_close(loss, -expected_weight * advantage)  # value: -min(r, C) * A
    loss.sum().backward()
    torch.testing.assert_close(student.grad, -expected_weight * advantage)  # grad: -min(r, C) * A * dlS
    assert (ratio > 2.0).any() and (ratio < 2.0).any()  # both branches exercised


def test_policy_gradient_loss_on_policy_is_reinforce():
    student = random_logprobs((2, 5), 0).requires_grad_()
    advantage = random_logprobs((2, 5), 1)
    loss, weight = policy_gradient_loss(student, student.detach(), advantage)
    torch.testing.assert_close(weight, torch.ones_like(weight))
    loss.sum().backward()
    torch.testing.assert_close(student.grad, -advantage)


def test_policy_gradient_loss_ppo_clip():
    student = random_logprobs((4, 6), 0).requires_grad_()
    sampler = student.detach() + (torch.rand(4, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64) - 0.5)
    advantage = torch.randn(4, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    loss, _ = policy_gradient_loss(student, sampler, advantage, clip_eps=0.2)
    ratio = torch.exp(student.detach() - sampler)
    expected = -torch.minimum(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    unclipped = (ratio * advantage) <= (ratio.clamp(0.8, 1.2) * advantage)
    torch.testing.assert_close(student.grad, torch.where(unclipped, -ratio * advantage, torch.zeros_like(ratio)))


# ---------------------------------------------------------------- TrOPD, divergences, GRPO (issue 3)

from opd.objectives.fullvocab import chunked_generalized_jsd  # noqa: E402
from opd.functional import (  # noqa: E402
    generalized_jsd,
    grpo_advantages,
    topk_forward_kl,
    trust_probability,
    trust_region_mask,
)


def test_trust_region_mask_frequency_matches_min_ratio_within_binomial_bounds():
    student = torch.log(torch.tensor([0.5, 0.2, 0.9, 0.05, 0.3], dtype=torch.float64))
    teacher = torch.log(torch.tensor([0.25, 0.4, 0.09, 0.0475, 0.03], dtype=torch.float64))
    expected = torch.clamp(teacher.exp() / student.exp(), max=1.0)  # [0.5, 1, 0.1, 0.95, 0.1]
    torch.testing.assert_close(trust_probability(student, teacher), expected)
    draws = 20_000
    generator = torch.Generator().manual_seed(0)
    hits = sum(trust_region_mask(student, teacher, generator).double() for _ in range(draws))
    frequency = hits / draws
    bound = 5 * torch.sqrt(expected * (1 - expected) / draws) + 1e-12  # 5 sigma: a false alarm is ~1e-6
    assert ((frequency - expected).abs() <= bound).all(), (frequency, expected)
    assert frequency[1] == 1.0  # the teacher likes the token more: always trusted
    a = trust_region_mask(student.expand(8, 5), teacher.expand(8, 5), torch.Generator().manual_seed(3))
    b = trust_region_mask(student.expand(8, 5), teacher.expand(8, 5), torch.Generator().manual_seed(3))
    c = trust_region_mask(student.expand(8, 5), teacher.expand(8, 5), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_topk_forward_kl_against_loop_reference():
    g = torch.Generator().manual_seed(1)
    student = torch.log_softmax(torch.randn(3, 4, 9, generator=g, dtype=torch.float64), -1)
    teacher = torch.log_softmax(torch.randn(3, 4, 9, generator=g, dtype=torch.float64), -1)
    values, ids = teacher.topk(4, dim=-1)
    student_topk = student.gather(-1, ids).requires_grad_()
    for renormalize in (False, True):
        result = topk_forward_kl(student_topk, values, renormalize)
        expected = torch.zeros(3, 4, dtype=torch.float64)
        for i in range(3):
            for j in range(4):
                mass = sum(values[i, j].exp().tolist())
                for k in range(4):
                    p = values[i, j, k].exp().item() / (mass if renormalize else 1.0)
                    expected[i, j] += p * (math.log(p) - student_topk[i, j, k].item())
        torch.testing.assert_close(result.detach(), expected)
        (grad,) = torch.autograd.grad(result.sum(), student_topk)
        p = values.exp() / (values.exp().sum(-1, keepdim=True) if renormalize else 1.0)
        torch.testing.assert_close(grad, -p)  # d/d lS_v = -p_T(v)
    # Without renormalisation, k = V gives the full forward KL.
    full = topk_forward_kl(student, teacher)
    torch.testing.assert_close(full, (teacher.exp() * (teacher - student)).sum(-1))


def test_topk_forward_kl_tail_bucket_end_points():
    """With k = V the teacher has no tail (0 log 0 = 0): the full forward KL, and a finite gradient even
    though the student's tail is 0 too (floored); with k = 1 the bucket is the binary KL of the top token."""
    g = torch.Generator().manual_seed(2)
    student = torch.log_softmax(torch.randn(2, 3, 6, generator=g, dtype=torch.float64), -1).requires_grad_()
    teacher = torch.log_softmax(torch.randn(2, 3, 6, generator=g, dtype=torch.float64), -1)
    values, ids = teacher.topk(6, dim=-1)
    full = topk_forward_kl(student.gather(-1, ids), values, tail_bucket=True)
    torch.testing.assert_close(full.detach(), kl(teacher, student.detach()))
    (grad,) = torch.autograd.grad(full.sum(), student)
    assert torch.isfinite(grad).all()
    values, ids = teacher.topk(1, dim=-1)
    binary = topk_forward_kl(student.gather(-1, ids), values, tail_bucket=True)
    p, q = values[..., 0].exp(), student.detach().gather(-1, ids)[..., 0].exp()
    expected = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    torch.testing.assert_close(binary.detach(), expected)
    with pytest.raises(ValueError, match="renormalise"):
        topk_forward_kl(student, teacher, renormalize=True, tail_bucket=True)


def kl(p_log, q_log):  # KL(p || q) over the last dimension, from the definition
    return (p_log.exp() * (p_log - q_log)).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_end_points_are_trls_forward_and_reverse_kl(temperature):
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    s = torch.log_softmax(student / temperature, -1)
    t = torch.log_softmax(teacher / temperature, -1)
    # TRL: beta = 0 is KL(teacher || student) (forward), beta = 1 is KL(student || teacher) (reverse).
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.0, temperature), kl(t, s))
    torch.testing.assert_close(generalized_jsd(student, teacher, 1.0, temperature), kl(s, t))
    for beta in (0.2, 0.5, 0.8):
        mixture = torch.log(beta * t.exp() + (1 - beta) * s.exp())
        expected = beta * kl(t, mixture) + (1 - beta) * kl(s, mixture)
        torch.testing.assert_close(generalized_jsd(student, teacher, beta, temperature), expected)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(student, teacher, 1.5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_generalized_jsd_equals_unchunked(beta):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(13, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(20, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(13, 4, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(20, 4, generator=g, dtype=torch.float64)
    chunked = chunked_generalized_jsd(hidden, weight, bias, teacher_hidden, teacher_weight, None, beta=beta,
                                      temperature=0.9, chunk_size=4)
    full = generalized_jsd(hidden @ weight.T + bias, teacher_hidden @ teacher_weight.T, beta, 0.9)
    torch.testing.assert_close(chunked, full)
    upstream = torch.randn(13, generator=g, dtype=torch.float64)
    mine = torch.autograd.grad((chunked * upstream).sum(), (hidden, weight, bias))
    theirs = torch.autograd.grad((full * upstream).sum(), (hidden, weight, bias))
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b)


def test_grpo_advantages_against_reference():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    result = grpo_advantages(rewards, 3)
    for start in range(0, 9, 3):
        group = rewards[start : start + 3].tolist()
        mean = sum(group) / 3
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 2)
        for i, r in enumerate(group):
            assert result[start + i].item() == pytest.approx((r - mean) / (std + 1e-6))
    assert (result[3:6] == 0).all()  # identical rewards: no signal, no NaN
    assert (grpo_advantages(rewards, 1) == 0).all()
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(rewards, 4)
