"""Combinators: objectives built from other objectives, without new code paths in the training step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from opd.objectives import Objective
from opd.objectives.pg import masked
from opd.types import Metric, Reduce, RolloutBatch, Signal, StudentOutputs, TeacherScores, TokenLoss


@dataclass(frozen=True, kw_only=True, slots=True)
class Weighted:
    """sum_i w_i * loss_i per token, e.g. tropd + 0.1 x grpo. Needs the union of the terms' needs."""

    terms: tuple[tuple[float, Objective], ...]

    @property
    def needs(self) -> frozenset[Signal]:
        return frozenset().union(*(objective.needs for _, objective in self.terms))

    @property
    def uses_lam(self) -> bool:
        return any(objective.uses_lam for _, objective in self.terms)

    @property
    def takes_dataset_responses(self) -> bool:
        return all(objective.takes_dataset_responses for _, objective in self.terms)

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        total, mask, metrics, diagnostics = None, None, {}, {}
        for weight, objective in self.terms:
            loss = objective(student, batch, teacher)
            total = weight * loss.per_token if total is None else total + weight * loss.per_token
            mask = loss.mask if mask is None else mask | loss.mask
            metrics.update(loss.metrics)
            for name, values in loss.diagnostics.items():  # the main objective (the first term) names them
                diagnostics.setdefault(name, values)
        return TokenLoss(per_token=total, mask=mask, metrics=metrics, diagnostics=diagnostics)


@dataclass(frozen=True, kw_only=True, slots=True)
class PrefixImitation:
    """Teacher-prefix tokens (algorithms §3): beta * (lT - lS) on the teacher-sampled token.

    The gradient is a beta-weighted NLL on the prefix: TrOPD's K1 estimate of beta * KL(pi_T || pi_S).
    """

    beta: float
    needs: frozenset[Signal] = frozenset({Signal.TEACHER_LOGPROBS})
    uses_lam: ClassVar[bool] = False
    takes_dataset_responses: ClassVar[bool] = False  # guidance prefixes are student rollouts

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        mask = batch.response_mask & batch.from_teacher
        loss = masked(self.beta * (teacher.logprobs - student.logprobs), mask)
        count = float(mask.sum())
        mean = float(loss.detach().sum() / count) if count else 0.0
        return TokenLoss(per_token=loss, mask=mask, metrics={
            "guidance/prefix_loss": Metric(value=mean, weight=count),
            "guidance/prefix_tokens": Metric(value=count, reduce=Reduce.SUM),
        })
