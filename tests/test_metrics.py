"""Every logged training metric against a float64 reference, on a hand-made batch.

The references are plain Python loops written from the definitions (docs/algorithms.md, functional.py's
docstrings); none calls the code under test. The batch has rows of different lengths, three domains (one
without a teacher), a truncated row, teacher-prefix tokens, rows without a reference, floored teacher
log-probs and (for the rollout metrics) a dataset-answer row. Padding positions hold finite garbage, so a
metric that reads past a mask is off by a lot.

Combining: the same batch goes through the real `train_step` (a table stands in for the student's forward,
see metrics_worker.py) as one rank with uneven micro-batches, as two ranks in-process (the gather simulated),
and as two gloo processes; every token- or row-weighted mean, std, max, min and sum must equal the
whole-batch reference. The implicit reward's p1 / p99 are the one approximation: across ranks they are the
MIN / MAX of the ranks' quantiles, bounded below (p99) and above (p1) in `test_quantiles_across_ranks_are_bounded`.

Tolerance: the library computes in float32 from float32 inputs; the reference computes in float64 from the
same (float32-rounded) inputs. rel = 1e-5, abs = 1e-6 (float32 sums of ~40 terms of size ~1-30).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from metrics_worker import LR, table_train_step

from opd.config import GuidanceConfig, ObjectiveConfig
from opd.metrics import as_floats, combine, rollout_metrics, topk_metrics
from opd.objectives import build_objective
from opd.runtime import distributed
from opd.train import select_rows
from opd.types import Metric, Reduce, RolloutBatch, StudentOutputs, TeacherScores

REL, ABS = 1e-5, 1e-6
N, T, K = 7, 6, 3
IS_CAP = 1.5  # low, so that a good share of the tokens is truncated
OBJECTIVES = ("opd", "gopd", "tropd", "grpo", "aopd", "fkl_topk", "opd+guidance")
BETA = 0.1  # guidance
QUANTILES = ("implicit_p1", "implicit_p99")
LAM_BY_DOMAIN = {"math": 1.5, "code": 1.25, "chat": 1.0}  # gopd's lam, per domain


def make_objective(name: str):
    """The one place objectives are built (their constructors are being refactored: adapt here)."""
    if name == "opd+guidance":
        return build_objective(ObjectiveConfig(name="opd", is_cap=IS_CAP,
                                               guidance=GuidanceConfig(enabled=True, beta=BETA)),
                               lam_by_domain=LAM_BY_DOMAIN)
    return build_objective(ObjectiveConfig(name=name, is_cap=IS_CAP), lam_by_domain=LAM_BY_DOMAIN)


def approx(value):
    return pytest.approx(value, rel=REL, abs=ABS)


# --------------------------------------------------------------------------- the hand-made batch


@dataclass
class Case:
    """Per-row and per-token inputs as float64 arrays (already rounded to float32)."""

    lengths: list[int]
    domain: tuple[str, ...]
    truncated: list[bool]
    from_teacher: np.ndarray  # [N, T] bool
    from_dataset: list[bool]
    has_teacher: list[bool]
    has_reference: list[bool]
    lam: list[float]
    floored: np.ndarray  # [N, T] bool
    rewards: list[float]
    group_advantages: list[float]  # grpo's, as if normalised within prompt groups
    lS: np.ndarray  # student
    lT: np.ndarray  # teacher
    lR: np.ndarray  # reference
    lOld: np.ndarray  # sampler
    entropy: np.ndarray  # student entropy
    noise: np.ndarray  # tropd's uniform draws
    student_topk: np.ndarray  # [N, T, K] lS at the teacher's top-k
    teacher_topk: np.ndarray  # [N, T, K] lT at the teacher's top-k

    def response(self, i, t):
        return t < self.lengths[i]


def make_case(dataset_row: bool = True) -> Case:
    rng = np.random.default_rng(7)
    r32 = lambda a: np.asarray(a, dtype=np.float32).astype(np.float64)  # noqa: E731
    lengths = [6, 3, 4, 1, 5, 5, 2]  # row 0 is the truncated one: the two ranks' maxima differ
    domain = ("math", "math", "code", "code", "math", "code", "chat")  # chat: no teacher, no reference
    from_teacher = np.zeros((N, T), dtype=bool)
    from_teacher[1, :2] = True  # a two-token teacher prefix
    from_teacher[5, 0] = True
    has_teacher = [d != "chat" for d in domain]
    has_reference = [d != "chat" and i != 3 for i, d in enumerate(domain)]  # row 3 (code) has none
    lam = [LAM_BY_DOMAIN[d] for d in domain]
    lS = -rng.uniform(0.05, 3.0, (N, T))
    lT = -rng.uniform(0.05, 4.0, (N, T))
    lR = -rng.uniform(0.05, 4.0, (N, T))
    floored = np.zeros((N, T), dtype=bool)
    for i, t in [(0, 2), (2, 1), (1, 0), (4, 3)]:  # (1, 0) is a teacher-prefix token: not in the KL tokens
        floored[i, t] = True
        lT[i, t] = -30.0
    lOld = np.minimum(lS + rng.normal(0.0, 0.8, (N, T)), -0.01)
    entropy = rng.uniform(0.1, 3.0, (N, T))
    noise = rng.uniform(0.0, 1.0, (N, T))
    student_topk = -rng.uniform(0.3, 5.0, (N, T, K))
    teacher_topk = -np.sort(rng.uniform(0.1, 4.0, (N, T, K)), axis=-1)
    for i in range(N):
        if not has_teacher[i]:
            lT[i] = 0.0  # a domain without a teacher carries lT = 0
        if not has_reference[i]:
            lR[i] = lT[i]  # a row without a reference carries lR = lT
        # Padding: finite garbage that any unmasked read would pick up.
        lS[i, lengths[i]:], lT[i, lengths[i]:], lR[i, lengths[i]:] = -1.0, -2.5, 0.5
        lOld[i, lengths[i]:], entropy[i, lengths[i]:], student_topk[i, lengths[i]:] = -4.0, 9.0, -0.1
    return Case(lengths=lengths, domain=domain, truncated=[True, False, False, False, False, False, False],
                from_teacher=from_teacher, from_dataset=[False, False, False, False, dataset_row, False, False],
                has_teacher=has_teacher, has_reference=has_reference, lam=r32(lam).tolist(), floored=floored,
                rewards=[1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0],
                group_advantages=r32([0.7, -0.7, 1.1, -0.3, -0.8, 0.5, 0.0]).tolist(),
                lS=r32(lS), lT=r32(lT), lR=r32(lR), lOld=r32(lOld), entropy=r32(entropy), noise=r32(noise),
                student_topk=r32(student_topk), teacher_topk=r32(teacher_topk))


def tensors(case: Case):
    """(batch, teacher, (lS, entropy, student top-k)) as the library's types, float32."""
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    mask = torch.arange(T)[None, :] < torch.tensor(case.lengths)[:, None]
    batch = RolloutBatch(
        prompt_ids=torch.arange(N)[:, None], prompt_mask=torch.ones(N, 1, dtype=torch.bool),  # row index
        response_ids=torch.ones(N, T, dtype=torch.long), response_mask=mask,
        from_teacher=torch.tensor(case.from_teacher), sampler_logprobs=f32(case.lOld),
        truncated=torch.tensor(case.truncated), domain=case.domain, prompt_index=tuple(range(N)),
        noise=f32(case.noise), from_dataset=torch.tensor(case.from_dataset), rewards=f32(case.rewards),
        group_advantages=f32(case.group_advantages),
    )
    teacher = TeacherScores(
        logprobs=f32(case.lT), topk_ids=torch.zeros(N, T, K, dtype=torch.int32), topk_logprobs=f32(case.teacher_topk),
        ref_logprobs=f32(case.lR), has_reference=torch.tensor(case.has_reference),
        has_teacher=torch.tensor(case.has_teacher), floored=torch.tensor(case.floored),
    )
    return batch, teacher, (f32(case.lS), f32(case.entropy), f32(case.student_topk))


# --------------------------------------------------------------------------- float64 references


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def std(values):  # unbiased
    values = list(values)
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def quantile(values, q):
    """Linear interpolation between order statistics (numpy's and torch's default)."""
    x = sorted(values)
    h = (len(x) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(x) - 1)
    return x[lo] + (h - lo) * (x[hi] - x[lo])


def reference_rollout(c: Case, rows) -> dict[str, float]:
    tokens = [(i, t) for i in rows for t in range(T) if c.response(i, t)]
    by_student = [(i, t) for i, t in tokens if not c.from_teacher[i, t] and not c.from_dataset[i]]
    given = [(i, t) for i, t in tokens if (i, t) not in by_student]
    kl = [(i, t) for i, t in by_student if c.has_teacher[i]]
    ratio = {(i, t): math.exp(c.lT[i, t] - c.lS[i, t]) for i, t in kl}
    out = {
        "rollout/response_length": mean(c.lengths[i] for i in rows),
        "rollout/response_length_max": max(c.lengths[i] for i in rows),
        "rollout/truncated_fraction": mean(float(c.truncated[i]) for i in rows),  # of rows
        "rollout/tokens": len(tokens),
        "rollout/teacher_token_fraction": mean(float(c.from_teacher[i, t]) for i, t in tokens),
        "student/entropy": mean(c.entropy[i, t] for i, t in by_student),
        "student/entropy_given_tokens": mean(c.entropy[i, t] for i, t in given),
        "rollout/sampler_gap_max": max(abs(c.lS[i, t] - c.lOld[i, t]) for i, t in by_student),
        "teacher/kl_k1": mean(c.lS[i, t] - c.lT[i, t] for i, t in kl),
        "teacher/kl_k3": mean(ratio[i, t] - 1.0 - (c.lT[i, t] - c.lS[i, t]) for i, t in kl),
        "teacher/floored_fraction": mean(float(c.floored[i, t]) for i, t in kl),
        "teacher/untrusted_fraction": mean(1.0 - min(ratio[i, t], 1.0) for i, t in kl),
        "reward/accuracy": mean(c.rewards[i] for i in rows),
    }
    for domain in sorted({c.domain[i] for i in rows}):
        out[f"reward/{domain}/accuracy"] = mean(c.rewards[i] for i in rows if c.domain[i] == domain)
        in_domain = [(i, t) for i, t in kl if c.domain[i] == domain]
        if in_domain:
            out[f"teacher/{domain}/kl_k1"] = mean(c.lS[i, t] - c.lT[i, t] for i, t in in_domain)
            out[f"teacher/{domain}/kl_k3"] = mean(ratio[i, t] - 1.0 - (c.lT[i, t] - c.lS[i, t]) for i, t in in_domain)
        implicit = [c.lT[i, t] - c.lR[i, t] for i, t in tokens if c.domain[i] == domain and c.has_reference[i]]
        if implicit:
            out.update({f"reward/{domain}/implicit_mean": mean(implicit),
                        f"reward/{domain}/implicit_p1": quantile(implicit, 0.01),
                        f"reward/{domain}/implicit_p99": quantile(implicit, 0.99),
                        f"reward/{domain}/implicit_max": max(implicit)})
    return out


def reference_objective(name: str, c: Case, rows) -> dict[str, float]:
    """The objective's metrics, plus "loss" (token-mean over the rows' response tokens) and "grad" (its
    derivative by a shift added to every student log-prob and top-k log-prob: the table student's parameter)."""
    tokens = [(i, t) for i in rows for t in range(T) if c.response(i, t) and not c.from_teacher[i, t]]

    def advantage(i, t):
        if name == "gopd":
            return c.lam[i] * (c.lT[i, t] - c.lR[i, t]) - (c.lS[i, t] - c.lR[i, t])
        if name == "grpo":
            return c.group_advantages[i]
        return c.lT[i, t] - c.lS[i, t]

    def ratio(i, t):
        return math.exp(c.lS[i, t] - c.lOld[i, t])

    def pg(area, on):
        return {f"{area}/advantage_mean": mean(advantage(*x) for x in on),
                f"{area}/advantage_std": std(advantage(*x) for x in on),
                f"{area}/is_weight_mean": mean(min(ratio(*x), IS_CAP) for x in on),
                f"{area}/is_weight_max": max(min(ratio(*x), IS_CAP) for x in on),
                f"{area}/is_truncated_fraction": mean(float(ratio(*x) >= IS_CAP) for x in on),
                f"{area}/tokens": len(on)}

    def topk_mass(i, t):
        return sum(math.exp(c.student_topk[i, t, k]) for k in range(K))

    # Per-token loss value and its derivative by the shift. Policy gradient: -w A and -w A.
    # Top-k forward KL: sum_k pT_k (lT_k - lS_k) and -sum_k pT_k.
    loss, grad = {}, {}

    def policy_gradient(on):
        for x in on:
            loss[x] = grad[x] = -min(ratio(*x), IS_CAP) * advantage(*x)

    def forward_kl(on):
        for i, t in on:
            p = [math.exp(c.teacher_topk[i, t, k]) for k in range(K)]
            loss[i, t] = sum(p[k] * (c.teacher_topk[i, t, k] - c.student_topk[i, t, k]) for k in range(K))
            grad[i, t] = -sum(p)

    if name in ("opd", "gopd", "grpo", "opd+guidance"):
        area = name.split("+")[0]
        policy_gradient(tokens)
        out = pg(area, tokens)
        if name == "grpo":
            out["grpo/reward_mean"] = mean(c.rewards[i] for i in rows)
        if name == "opd+guidance":  # beta (lT - lS) on teacher-prefix tokens
            prefix = [(i, t) for i in rows for t in range(T) if c.response(i, t) and c.from_teacher[i, t]]
            for i, t in prefix:
                loss[i, t], grad[i, t] = BETA * (c.lT[i, t] - c.lS[i, t]), -BETA
            out.update({"guidance/prefix_loss": mean(loss[x] for x in prefix), "guidance/prefix_tokens": len(prefix)})
    elif name == "tropd":
        trust = {(i, t): min(math.exp(c.lT[i, t] - c.lS[i, t]), 1.0) for i, t in tokens}
        trusted = [(i, t) for i, t in tokens if c.noise[i, t] < trust[i, t]]
        outliers = [x for x in tokens if x not in trusted]
        policy_gradient(trusted)
        forward_kl(outliers)
        out = pg("tropd", trusted)
        out.update({
            "tropd/outlier_fraction": len(outliers) / len(tokens),
            "tropd/p_trust_mean": mean(trust.values()),
            "tropd/trust_loss": mean(loss[x] for x in trusted),
            "tropd/outlier_loss": mean(loss[x] for x in outliers),
            "tropd/student_topk_mass": mean(topk_mass(*x) for x in tokens),
        })
    elif name == "aopd":  # policy gradient where A > 0, top-k forward KL elsewhere
        positive = [x for x in tokens if advantage(*x) > 0]
        policy_gradient(positive)
        forward_kl([x for x in tokens if x not in positive])
        out = {**pg("aopd", positive), "aopd/positive_fraction": len(positive) / len(tokens)}
    elif name == "fkl_topk":
        forward_kl(tokens)
        out = {"fkl_topk/loss": mean(loss[x] for x in tokens),
               "fkl_topk/student_topk_mass": mean(topk_mass(*x) for x in tokens)}
    else:
        raise ValueError(name)
    denominator = sum(c.lengths[i] for i in rows)  # token-mean divides by the response tokens
    out["loss"] = sum(loss.values()) / denominator
    out["grad"] = sum(grad.values()) / denominator
    return out


def reference_step(name: str, c: Case) -> dict[str, float]:
    """Everything `train_step` logs for the whole batch."""
    expected = {**reference_rollout(c, range(N)), **reference_objective(name, c, range(N))}
    gradient = expected.pop("grad")
    expected.update({"optim/grad_norm": abs(gradient), "optim/skipped_steps": 0.0, "optim/lr": LR})
    return expected


def assert_matches(actual: dict[str, float], expected: dict[str, float], skip=()) -> None:
    assert sorted(actual) == sorted(expected)
    wrong = {k: (actual[k], v) for k, v in expected.items()
             if k.rsplit("/", 1)[-1] not in skip and actual[k] != approx(v)}
    assert not wrong, f"(actual, expected): {wrong}"


def test_the_case_has_what_it_claims():
    c = make_case()
    batch, _, _ = tensors(c)
    assert len(set(c.lengths)) > 3 and any(c.truncated) and c.from_teacher.any() and any(c.from_dataset)
    assert not all(c.has_teacher) and not all(c.has_reference)
    # No token sits on a decision boundary that float32 could flip (IS cap, TrOPD's Bernoulli draw).
    for i, t in zip(*np.nonzero(batch.response_mask.numpy())):
        assert abs(math.exp(c.lS[i, t] - c.lOld[i, t]) - IS_CAP) > 1e-4
        assert abs(c.noise[i, t] - min(math.exp(c.lT[i, t] - c.lS[i, t]), 1.0)) > 1e-4
        assert abs(c.lT[i, t] - c.lS[i, t]) > 1e-4  # aopd's sign split
    sampled = [(i, t) for i in range(N) for t in range(c.lengths[i]) if not c.from_teacher[i, t]]
    assert 0.2 < mean(math.exp(c.lS[x] - c.lOld[x]) >= IS_CAP for x in sampled) < 0.8  # some truncated


# --------------------------------------------------------------------------- the whole batch


def test_rollout_metrics_match_the_reference():
    c = make_case()
    batch, teacher, (logprobs, entropy, _) = tensors(c)
    expected = reference_rollout(c, range(N))
    assert {k for k in expected if "implicit" in k} == {f"reward/{d}/implicit_{s}" for d in ("code", "math")
                                                        for s in ("mean", "p1", "p99", "max")}
    assert_matches(as_floats(rollout_metrics(batch, teacher, logprobs, entropy)), expected)


def test_implicit_reward_sign_and_rows_without_reference():
    # Reward = lT - lR: a teacher above the reference is a positive reward; row 3 has no reference.
    c = make_case()
    c.lT[0, :] = c.lR[0, :] + 2.0  # row 0 (math) strongly rewarded
    batch, teacher, (logprobs, entropy, _) = tensors(c)
    metrics = as_floats(rollout_metrics(batch, teacher, logprobs, entropy))
    assert metrics["reward/math/implicit_max"] == approx(2.0)
    assert metrics["reward/math/implicit_mean"] == approx(reference_rollout(c, range(N))["reward/math/implicit_mean"])
    only_code_with_reference = [c.lT[5, t] - c.lR[5, t] for t in range(5)] + [c.lT[2, t] - c.lR[2, t] for t in range(4)]
    assert metrics["reward/code/implicit_mean"] == approx(mean(only_code_with_reference))


def test_metrics_of_a_batch_without_student_tokens_or_reference():
    # Every row given (sft-like) and no reference: no KL, no student entropy, no implicit reward, not zeros.
    c = make_case()
    c.from_teacher[:] = True
    batch, teacher, (logprobs, entropy, _) = tensors(c)
    teacher = replace(teacher, ref_logprobs=None)
    metrics = as_floats(rollout_metrics(batch, teacher, logprobs, entropy))
    assert not any(k.startswith(("teacher/", "student/entropy")) and k != "student/entropy_given_tokens"
                   for k in metrics)
    assert not any("implicit" in k for k in metrics)
    assert metrics["rollout/teacher_token_fraction"] == 1.0
    assert metrics["student/entropy_given_tokens"] == approx(
        mean(c.entropy[i, t] for i in range(N) for t in range(c.lengths[i])))


def test_sampler_gap_max_is_over_student_tokens_and_the_max_across_ranks(monkeypatch):
    """rollout/sampler_gap_max by hand: every response token's |lS - lOld| is 0.25 except one student token
    of row 2 (1.5); larger gaps on a teacher-prefix token, a dataset row and padding must not count. Two
    ranks: the 1.5 is on the first, so the second rank's own max is 0.25 and the combined one 1.5."""
    c = make_case(dataset_row=True)
    c.lOld = c.lS + 0.25
    c.lOld[2, 3] = c.lS[2, 3] - 1.5  # row 2 has 4 response tokens, none from a teacher
    c.lOld[1, 0] = c.lS[1, 0] - 9.0  # a teacher-prefix token
    c.lOld[4, 1] = c.lS[4, 1] - 9.0  # row 4 is a dataset answer (gkd)
    c.lOld[3, 2] = c.lS[3, 2] - 9.0  # row 3 has 1 response token: padding
    assert c.from_teacher[1, 0] and c.from_dataset[4] and not c.from_teacher[2].any() and c.lengths[3] == 1
    batch, teacher, (logprobs, entropy, _) = tensors(c)
    whole = rollout_metrics(batch, teacher, logprobs, entropy)["rollout/sampler_gap_max"]
    assert whole.reduce is Reduce.MAX and whole.value == pytest.approx(1.5, abs=1e-5)
    combined, per_rank = rank_metrics("opd", c, [(0, 3), (3, N)], 2, monkeypatch)
    ranks = [m["rollout/sampler_gap_max"].value for m in per_rank]
    assert ranks == [pytest.approx(1.5, abs=1e-5), pytest.approx(0.25, abs=1e-5)]
    assert combined["rollout/sampler_gap_max"].value == pytest.approx(1.5, abs=1e-5)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_metrics_match_the_reference(name):
    c = make_case(dataset_row=False)
    batch, teacher, (logprobs, _, topk) = tensors(c)
    student = StudentOutputs(logprobs=logprobs, entropy=None, topk_logprobs=topk)
    expected = reference_objective(name, c, range(N))
    del expected["loss"], expected["grad"]
    assert_matches(as_floats(make_objective(name)(student, batch, teacher).metrics), expected)


# --------------------------------------------------------------------------- combining


def test_combine_reductions():
    parts = [
        {"m": Metric(value=2.0, weight=1.0), "s": Metric(value=3.0, reduce=Reduce.SUM),
         "hi": Metric(value=1.0, reduce=Reduce.MAX), "lo": Metric(value=-1.0, reduce=Reduce.MIN)},
        {"m": Metric(value=5.0, weight=3.0), "s": Metric(value=4.0, reduce=Reduce.SUM),
         "hi": Metric(value=7.0, reduce=Reduce.MAX), "lo": Metric(value=-4.0, reduce=Reduce.MIN)},
        {"m": Metric(value=99.0, weight=0.0), "only_here": Metric(value=1.5, weight=2.0)},  # empty part
    ]
    combined = as_floats(combine(parts))
    assert combined == {"m": approx((2.0 + 15.0) / 4.0), "s": 7.0, "hi": 7.0, "lo": -4.0, "only_here": 1.5}
    # Pooled std of [1, 2] (n 2, mean 1.5), [4] (n 1), [] and [0, 6, 9] (n 3, mean 5): the std of all six.
    values = [[1.0, 2.0], [4.0], [], [0.0, 6.0, 9.0]]
    metrics = [{"std": Metric(value=std(v) if len(v) > 1 else 0.0, reduce=Reduce.STD, weight=float(len(v)),
                              mean=mean(v) if v else 0.0)} for v in values]
    whole = std([x for v in values for x in v])
    assert combine(metrics)["std"].value == approx(whole)
    assert combine([combine(metrics[:2]), combine(metrics[2:])])["std"].value == approx(whole)  # associative
    assert combine(metrics)["std"].weight == 6.0 and combine(metrics)["std"].mean == approx(22.0 / 6.0)


def rank_metrics(name, c, shares, micro_batch_size, monkeypatch):
    """train_step on each share as one rank, the gather simulated in-process; returns (combined, per rank)."""
    batch, teacher, tables = tensors(c)
    gathered = []
    monkeypatch.setattr(distributed, "gather_objects", lambda metrics: gathered.append(metrics) or [metrics])
    # the token-mean denominator all-reduced over ranks: the whole batch's response tokens
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda value: float(batch.response_mask.sum()))
    for start, stop in shares:
        rows = slice(start, stop)
        table_train_step(select_rows(batch, rows), select_rows(teacher, rows), tables, make_objective(name),
                         micro_batch_size)
    return combine(gathered), gathered


@pytest.mark.parametrize("name", OBJECTIVES)
def test_one_rank_uneven_micro_batches_give_the_whole_batch(name):
    c = make_case(dataset_row=False)
    batch, teacher, tables = tensors(c)
    metrics = table_train_step(batch, teacher, tables, make_objective(name), micro_batch_size=3)  # rows 3, 3, 1
    # grad_norm: the gradient is summed over micro-batches (each divided by the whole batch's token count).
    assert_matches(as_floats(metrics), reference_step(name, c))


@pytest.mark.parametrize("name", OBJECTIVES)
def test_two_ranks_give_the_whole_batch(name, monkeypatch):
    c = make_case(dataset_row=False)
    combined, _ = rank_metrics(name, c, [(0, 3), (3, N)], 2, monkeypatch)  # rows (2, 1) and (2, 2)
    expected = {k: v for k, v in reference_step(name, c).items() if not k.startswith("optim/")}  # after the gather
    assert_matches(as_floats(combined), expected, skip=QUANTILES)


def test_quantiles_across_ranks_are_bounded(monkeypatch):
    """p1 / p99 across ranks are MIN / MAX of the ranks' quantiles (each rank's own is exact). That is not
    the whole batch's quantile, but close: with k ranks and n tokens, the MAX of the parts' q-quantiles
    (linear interpolation) is at least the whole's quantile at level ((n - k) q - 1) / (n - 1) (each part has
    more than (n_i - 1) q of its values at or below its quantile) and at most the whole's max; the MIN of
    the p1s mirrors it. The error in level is O(k / n): negligible at real token counts."""
    c = make_case(dataset_row=False)
    shares = [(0, 2), (2, 5), (5, N)]
    combined, _ = rank_metrics("opd", c, shares, 2, monkeypatch)
    for domain in ("math", "code"):
        parts = [[c.lT[i, t] - c.lR[i, t] for i in range(a, b) for t in range(c.lengths[i])
                  if c.domain[i] == domain and c.has_reference[i]] for a, b in shares]
        parts = [p for p in parts if p]
        whole = sorted(x for p in parts for x in p)
        level = max(((len(whole) - len(parts)) * 0.99 - 1) / (len(whole) - 1), 0.0)
        p99, p1 = combined[f"reward/{domain}/implicit_p99"].value, combined[f"reward/{domain}/implicit_p1"].value
        assert p99 == approx(max(quantile(p, 0.99) for p in parts))  # MAX of the ranks' exact quantiles
        assert p1 == approx(min(quantile(p, 0.01) for p in parts))
        assert quantile(whole, level) - ABS <= p99 <= whole[-1] + ABS
        assert whole[0] - ABS <= p1 <= quantile(whole, 1.0 - level) + ABS  # the mirror image
        assert combined[f"reward/{domain}/implicit_max"].value == approx(whole[-1])


def test_two_gloo_processes_give_the_whole_batch(tmp_path, monkeypatch):
    """The real gather (and the gradient all-reduce) with 2 processes on uneven shares of rows."""
    name = "tropd"
    c = make_case(dataset_row=False)
    batch, teacher, tables = tensors(c)
    shares = [(0, 3), (3, N)]
    inputs = tmp_path / "inputs.pt"
    torch.save((batch, teacher, tables, make_objective(name), shares, 2), inputs)
    here = Path(__file__).parent
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(here / "metrics_worker.py"), str(inputs), str(tmp_path / "metrics.pt")]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = as_floats(torch.load(tmp_path / "metrics.pt", weights_only=False))
    assert_matches(metrics, reference_step(name, c), skip=QUANTILES)
    simulated, _ = rank_metrics(name, c, shares, 2, monkeypatch)
    for key in QUANTILES:  # the same MIN / MAX of the ranks' quantiles as the in-process gather
        for domain in ("math", "code"):
            assert metrics[f"reward/{domain}/{key}"] == simulated[f"reward/{domain}/{key}"].value


def test_progress_without_a_terminal_is_a_line_every_log_every_steps(tmp_path, capsys):
    from opd.runtime.monitor import MetricsLogger

    logger = MetricsLogger(tmp_path, total_steps=5, start_step=0, tensorboard=False, progress=True, log_every=2,
                           terminal=False)
    for step in range(1, 6):
        logger.log(step, {"teacher/kl_k1": 0.5 * step, "reward/math/implicit_mean": 0.25})
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[3] for line in lines] == ["2/5", "4/5", "5/5"]  # every 2nd step and the last
    assert lines[0].startswith("opd train: step 2/5  kl1 1 ") and "r[math] 0.25/" in lines[0]


def test_the_progress_bar_shows_per_domain_labels_as_written(tmp_path):
    """rich reads `[math]` as a style tag and swallows it unless the figures are not markup."""
    from opd.runtime.monitor import MetricsLogger

    logger = MetricsLogger(tmp_path, total_steps=2, start_step=0, tensorboard=False, progress=True, terminal=True)
    logger.log(1, {"reward/math/implicit_mean": 0.25})
    figures = logger._progress.columns[-1].render(logger._progress.tasks[0]).plain
    logger.close()
    assert "r[math] 0.25/0/0" in figures


def test_topk_metrics_match_the_reference():
    """topk/student_mass and topk/overlap over the student-sampled tokens of rows with a teacher."""
    c = make_case()
    batch, teacher, (logprobs, _, topk) = tensors(c)
    generator = torch.Generator().manual_seed(3)
    teacher_ids = torch.stack([torch.randperm(8, generator=generator)[:K] for _ in range(N * T)]).reshape(N, T, K)
    student_ids = torch.stack([torch.randperm(8, generator=generator)[:K] for _ in range(N * T)]).reshape(N, T, K)
    teacher = replace(teacher, topk_ids=teacher_ids.to(torch.int32))
    student = StudentOutputs(logprobs=logprobs, entropy=None, topk_logprobs=topk, topk_ids=student_ids.to(torch.int32))
    tokens = [(i, t) for i in range(N) for t in range(c.lengths[i])
              if not c.from_teacher[i, t] and not c.from_dataset[i] and c.has_teacher[i]]
    overlaps = [len(set(teacher_ids[i, t].tolist()) & set(student_ids[i, t].tolist())) / K for i, t in tokens]
    assert 0 < mean(overlaps) < 1  # partial overlaps exercised
    expected = {"topk/student_mass": mean(sum(math.exp(x) for x in c.student_topk[i, t]) for i, t in tokens),
                "topk/overlap": mean(overlaps)}
    assert as_floats(topk_metrics(student, batch, teacher)) == {k: approx(v) for k, v in expected.items()}
    assert topk_metrics(replace(student, topk_ids=None), batch, teacher) == {}  # objectives without top-k
