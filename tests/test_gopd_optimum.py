"""The G-OPD optimum (algorithms §1): on a one-step policy over a few tokens (a bandit), training with the
`gopd` objective converges to softmax(lam*log pi_T + (1-lam)*log pi_R)."""

from __future__ import annotations

import pytest
import torch

from opd.aggregate import aggregate
from opd.config import ObjectiveConfig
from opd.objectives import build_objective
from opd.types import RolloutBatch, StudentOutputs, TeacherScores

VOCAB = 6
SAMPLES = 4096
STEPS = 300
TOLERANCE = 0.02  # max |p_student - p_target| over the vocabulary


def bandit_batch(tokens: torch.Tensor, sampler_logprobs: torch.Tensor) -> RolloutBatch:
    n = tokens.shape[0]
    return RolloutBatch(
        prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.bool),
        response_ids=tokens[:, None], response_mask=torch.ones(n, 1, dtype=torch.bool),
        from_teacher=torch.zeros(n, 1, dtype=torch.bool), sampler_logprobs=sampler_logprobs[:, None],
        truncated=torch.zeros(n, dtype=torch.bool), domain=("bandit",) * n, prompt_index=(0,) * n,
    )


@pytest.mark.parametrize(("lam", "staleness"), [(0.5, 0), (1.0, 0), (1.25, 0), (1.25, 1), (0.5, 1)])
def test_gopd_converges_to_the_closed_form_optimum(lam, staleness):
    """With staleness 1 (rollout.async) each batch is sampled from the policy of one step before; the
    truncated IS weight exp(lS - lOld) corrects for it and the optimum is the same."""
    generator = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(VOCAB, generator=generator, dtype=torch.float64)
    # A reference far from the teacher, so that lam moves the optimum visibly (checked below).
    reference_logits = teacher_logits + 3 * torch.randn(VOCAB, generator=generator, dtype=torch.float64)
    log_teacher, log_reference = torch.log_softmax(teacher_logits, 0), torch.log_softmax(reference_logits, 0)
    target = torch.softmax(lam * log_teacher + (1 - lam) * log_reference, 0)
    logits = torch.zeros(VOCAB, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS)
    objective = build_objective(ObjectiveConfig(name="gopd", lam=lam), lam_by_domain={"bandit": lam})
    samplers = [torch.log_softmax(logits.detach(), 0)] * (staleness + 1)  # the policies of the last steps
    for _ in range(STEPS):
        log_student = torch.log_softmax(logits, 0)
        samplers = [*samplers[1:], log_student.detach()]
        log_sampler = samplers[0]  # `staleness` optimizer steps old
        tokens = torch.multinomial(log_sampler.exp(), SAMPLES, replacement=True, generator=generator)
        batch = bandit_batch(tokens, log_sampler[tokens])
        teacher = TeacherScores(
            logprobs=log_teacher[tokens][:, None], topk_ids=None, topk_logprobs=None,
            ref_logprobs=log_reference[tokens][:, None], has_reference=torch.ones(SAMPLES, dtype=torch.bool),
            has_teacher=torch.ones(SAMPLES, dtype=torch.bool),
            floored=torch.zeros(SAMPLES, 1, dtype=torch.bool),
        )
        student = StudentOutputs(logprobs=log_student[tokens][:, None], entropy=None, topk_logprobs=None)
        loss = aggregate(objective(student, batch, teacher).per_token, batch.response_mask, "token-mean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    learned = torch.softmax(logits.detach(), 0)
    error = (learned - target).abs().max().item()
    assert error < TOLERANCE, f"lam={lam}: learned {learned.tolist()} target {target.tolist()} (max error {error:.4f})"
    if lam != 1.0:  # the test can tell lam apart: the plain-OPD optimum (the teacher) is far away
        assert (learned - log_teacher.exp()).abs().max().item() > 3 * TOLERANCE
