"""What a step reports: rollout and teacher metrics of the whole batch, and combining micro-batch metrics.

Names are "<area>/<name>"; how a metric combines is its `Reduce`, never parsed from its name.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from opd.aggregate import masked_mean, masked_quantile
from opd.functional import kl_estimate
from opd.types import Metric, Reduce, RolloutBatch, StudentOutputs, TeacherScores


def combine(metric_sets: list[dict[str, Metric]]) -> dict[str, Metric]:
    """Merge per-micro-batch (or per-rank) metrics by each metric's reduction.

    MEAN is weighted by Metric.weight and STD pools the parts' moments, so both equal the whole batch's
    value; MAX, MIN and SUM are exact too. Combining is associative: micro-batches, then ranks, gives the
    same as all parts at once. Quantiles (the implicit reward's p1 / p99) are logged as MIN / MAX of the
    parts' quantiles: exact within a rank (rollout metrics see the rank's whole batch), a bound across ranks.
    """
    grouped: dict[str, list[Metric]] = defaultdict(list)
    for metrics in metric_sets:
        for name, metric in metrics.items():
            grouped[name].append(metric)
    combined = {}
    for name, items in grouped.items():
        reduce = items[0].reduce
        values = [m.value for m in items]
        if reduce is Reduce.MEAN:
            total = sum(m.weight for m in items)
            value = sum(m.value * m.weight for m in items) / total if total else 0.0
            combined[name] = Metric(value=value, reduce=reduce, weight=total)
        elif reduce is Reduce.STD:
            combined[name] = _pooled_std(items)
        elif reduce is Reduce.SUM:
            combined[name] = Metric(value=sum(values), reduce=reduce)
        elif reduce is Reduce.MAX:
            combined[name] = Metric(value=max(values), reduce=reduce)
        else:
            combined[name] = Metric(value=min(values), reduce=reduce)
    return combined


def _pooled_std(items: list[Metric]) -> Metric:
    """Unbiased std of the union of parts, from each part's count n, mean m and unbiased std s
    (Chan et al.): M2 = sum (n - 1) s^2 + n (m - mean)^2, std = sqrt(M2 / (count - 1))."""
    items = [m for m in items if m.weight > 0]
    count = sum(m.weight for m in items)
    if not count:
        return Metric(value=0.0, reduce=Reduce.STD, weight=0.0)
    mean = sum(m.mean * m.weight for m in items) / count
    squares = sum((m.weight - 1.0) * m.value**2 + m.weight * (m.mean - mean) ** 2 for m in items)
    value = math.sqrt(max(squares, 0.0) / (count - 1.0)) if count > 1 else 0.0
    return Metric(value=value, reduce=Reduce.STD, weight=count, mean=mean)


def rollout_metrics(
    batch: RolloutBatch,
    teacher: TeacherScores,
    student_logprobs: Tensor,  # [N, T] detached, from the training forward
    student_entropy: Tensor,  # [N, T] detached
) -> dict[str, Metric]:
    """Teacher KL, implicit reward per domain, lengths and entropy of the batch (both papers plot these)."""
    # KL estimators assume tokens the student sampled, scored by a teacher.
    sampled_by_student = batch.sampled_by_student
    sampled = sampled_by_student & teacher.has_teacher[:, None]
    count = float(sampled.sum())
    all_tokens = float(batch.response_mask.sum())
    given = batch.response_mask & ~sampled_by_student
    lengths = batch.response_mask.sum(dim=1).float()
    metrics = {
        "rollout/response_length": Metric(value=float(lengths.mean()), weight=float(len(lengths))),
        "rollout/response_length_max": Metric(value=float(lengths.max()), reduce=Reduce.MAX),
        "rollout/truncated_fraction": Metric(value=float(batch.truncated.float().mean()), weight=float(len(lengths))),
        "rollout/tokens": Metric(value=all_tokens, reduce=Reduce.SUM),
        "rollout/teacher_token_fraction": Metric(value=masked_mean(batch.from_teacher.float(), batch.response_mask),
                                                 weight=all_tokens),
    }
    # Entropy of the student's distribution at the response tokens it sampled, and separately at the tokens
    # it was given (sft's whole signal); a batch with none of either logs nothing rather than a 0.
    if sampled_by_student.any():
        metrics["student/entropy"] = Metric(value=masked_mean(student_entropy, sampled_by_student),
                                            weight=float(sampled_by_student.sum()))
        metrics["rollout/sampler_gap_max"] = sampler_gap_max(batch, student_logprobs)
    if given.any():
        metrics["student/entropy_given_tokens"] = Metric(value=masked_mean(student_entropy, given),
                                                         weight=float(given.sum()))
    if count:
        metrics.update({
            "teacher/kl_k1": Metric(value=masked_mean(kl_estimate(student_logprobs, teacher.logprobs, "k1"), sampled),
                                    weight=count),
            "teacher/kl_k3": Metric(value=masked_mean(kl_estimate(student_logprobs, teacher.logprobs, "k3"), sampled),
                                    weight=count),
            "teacher/floored_fraction": Metric(value=masked_mean(teacher.floored.float(), sampled), weight=count),
            # TrOPD's expected outlier share, 1 - min(pi_T / pi_S, 1), logged for every objective so that
            # OPD and TrOPD runs can be compared on the same axis.
            "teacher/untrusted_fraction": Metric(
                value=masked_mean(1.0 - (teacher.logprobs - student_logprobs).exp().clamp(max=1.0), sampled),
                weight=count),
        })
    metrics.update(domain_kl_metrics(batch, teacher, student_logprobs, sampled))
    metrics.update(padded_mass_metrics(batch, teacher))
    if batch.rewards is not None:
        metrics.update(accuracy_metrics(batch))
    if teacher.ref_logprobs is not None:
        metrics.update(implicit_reward_metrics(batch, teacher))
    return metrics


def sampler_gap_max(batch: RolloutBatch, student_logprobs: Tensor) -> Metric:
    """max |lS - lOld| over the tokens the student sampled (MAX: the largest on any rank): how far the
    engine that sampled them (lOld: vLLM, a server, a stale copy under rollout.async) is from the trainer's
    model at the start of the step (lS). With HF rollouts it is float error; a large one means the engine
    samples from another distribution than the one trained (unsynced weights, another dtype or kernel)."""
    gap = (student_logprobs.float() - batch.sampler_logprobs.float()).abs()
    return Metric(value=float(gap[batch.sampled_by_student].max()), reduce=Reduce.MAX)


def topk_metrics(student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> dict[str, Metric]:
    """For objectives on the teacher's top-k, over the tokens the student sampled: the student's mass on the
    teacher's top-k (sum of p_S there) and the overlap |topk_T ∩ topk_S| / K of the two top-k sets."""
    if student.topk_ids is None or student.topk_logprobs is None:
        return {}
    sampled = batch.sampled_by_student & teacher.has_teacher[:, None].to(batch.response_mask.device)
    count = float(sampled.sum())
    if not count:
        return {}
    mass = student.topk_logprobs.detach().exp().sum(dim=-1)
    return {
        "topk/student_mass": Metric(value=masked_mean(mass, sampled), weight=count),
        "topk/overlap": Metric(value=masked_mean(topk_overlap(teacher.topk_ids, student.topk_ids), sampled),
                               weight=count),
    }


def topk_overlap(first_ids: Tensor, second_ids: Tensor) -> Tensor:  # [..., K] each -> [...] in [0, 1]
    """|first ∩ second| / K for two sets of K distinct ids per position, by sorting and binary search
    (O(K log K) per position; an all-pairs comparison would hold [..., K, K])."""
    ordered = second_ids.long().sort(dim=-1).values
    found = torch.searchsorted(ordered, first_ids.long()).clamp(max=ordered.shape[-1] - 1)
    return (ordered.gather(-1, found) == first_ids.long()).float().mean(dim=-1)


def implicit_reward_metrics(batch: RolloutBatch, teacher: TeacherScores) -> dict[str, Metric]:
    """lT - lR per domain: G-OPD's dense reward. A rising max/p99 at lam = 1.5 signals reward hacking."""
    reward = teacher.logprobs - teacher.ref_logprobs
    metrics = {}
    for domain in sorted(set(batch.domain)):
        in_domain = _rows_of(batch, domain) & teacher.has_reference
        mask = batch.response_mask & in_domain[:, None]
        if not mask.any():
            continue
        count = float(mask.sum())
        prefix = f"reward/{domain}"
        metrics[f"{prefix}/implicit_mean"] = Metric(value=masked_mean(reward, mask), weight=count)
        # Exact for this rank's rows; across ranks MIN / MAX of the ranks' quantiles, which only bounds the
        # whole batch's (within O(ranks / tokens) in quantile level: see tests/test_metrics.py).
        metrics[f"{prefix}/implicit_p1"] = Metric(value=masked_quantile(reward, mask, 0.01), reduce=Reduce.MIN)
        metrics[f"{prefix}/implicit_p99"] = Metric(value=masked_quantile(reward, mask, 0.99), reduce=Reduce.MAX)
        metrics[f"{prefix}/implicit_max"] = Metric(value=float(reward[mask].max()), reduce=Reduce.MAX)
    return metrics


def domain_kl_metrics(batch: RolloutBatch, teacher: TeacherScores, student_logprobs: Tensor,
                      sampled: Tensor) -> dict[str, Metric]:
    """teacher/<domain>/kl_k1 and kl_k3: each teacher's KL over its own domain's sampled tokens (the overall
    teacher/kl_* mixes teachers, so one domain's teacher drifting can hide behind the others)."""
    metrics: dict[str, Metric] = {}
    for domain in sorted(set(batch.domain)):
        in_domain = sampled & _rows_of(batch, domain)[:, None]
        count = float(in_domain.sum())
        if not count:
            continue
        for estimator in ("k1", "k3"):
            value = masked_mean(kl_estimate(student_logprobs, teacher.logprobs, estimator), in_domain)
            metrics[f"teacher/{domain}/kl_{estimator}"] = Metric(value=value, weight=count)
    return metrics


def padded_mass_metrics(batch: RolloutBatch, teacher: TeacherScores) -> dict[str, Metric]:
    """teacher/<domain>/padded_mass_mean and _max: the probability a padded teacher head put on the ids
    teachers.N.drop_padded_logits dropped, over the response tokens it scored (large: not padding)."""
    if teacher.padded_mass is None:
        return {}
    metrics: dict[str, Metric] = {}
    for domain in sorted(set(batch.domain)):
        mask = batch.response_mask & (_rows_of(batch, domain) & teacher.drops_padded)[:, None]
        if not mask.any():
            continue
        metrics[f"teacher/{domain}/padded_mass_mean"] = Metric(value=masked_mean(teacher.padded_mass, mask),
                                                               weight=float(mask.sum()))
        metrics[f"teacher/{domain}/padded_mass_max"] = Metric(value=float(teacher.padded_mass[mask].max()),
                                                              reduce=Reduce.MAX)
    return metrics


def accuracy_metrics(batch: RolloutBatch) -> dict[str, Metric]:
    """Graded accuracy of the rollouts per domain (logged even when the objective ignores it)."""
    metrics = {"reward/accuracy": Metric(value=float(batch.rewards.mean()), weight=float(batch.num_rows))}
    for domain in sorted(set(batch.domain)):
        rows = _rows_of(batch, domain)
        metrics[f"reward/{domain}/accuracy"] = Metric(value=float(batch.rewards[rows].mean()),
                                                      weight=float(rows.sum()))
        if batch.grading_failed is not None:
            metrics[f"reward/{domain}/grading_failures"] = Metric(value=float(batch.grading_failed[rows].sum()),
                                                                  reduce=Reduce.SUM)
    if batch.grading_failed is not None:  # grades that could not be computed and count as 0: never silent
        metrics["reward/grading_failures"] = Metric(value=float(batch.grading_failed.sum()), reduce=Reduce.SUM)
    return metrics


def _rows_of(batch: RolloutBatch, domain: str) -> Tensor:  # [N] bool
    return torch.tensor([d == domain for d in batch.domain])


def as_floats(metrics: dict[str, Metric]) -> dict[str, float]:
    return {name: float(metric.value) for name, metric in sorted(metrics.items())}
