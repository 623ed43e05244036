"""GRPO (Shao et al. 2024): policy gradient with group-normalised outcome rewards from a grader.

Used to train the domain teachers (G-OPD §4) and addable to any objective with a weight. Advantages are
normalised within each prompt's group over the whole batch before micro-batching
(RolloutBatch.group_advantages), so the gradient does not depend on how the batch is cut. No KL term
(the G-OPD teachers use KL 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.objectives import register
from opd.objectives.pg import PolicyGradientSettings, masked_policy_gradient, student_sampled
from opd.types import Metric, RolloutBatch, Signal, StudentOutputs, TeacherScores, TokenLoss


@register("grpo")
@dataclass(frozen=True, kw_only=True, slots=True)
class Grpo:
    settings: PolicyGradientSettings = PolicyGradientSettings()
    needs: frozenset[Signal] = frozenset({Signal.REWARD})

    @classmethod
    def from_config(cls, config, temperature: float) -> "Grpo":
        return cls(settings=PolicyGradientSettings.from_config(config))

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss:
        if batch.group_advantages is None:
            raise ValueError("grpo needs RolloutBatch.group_advantages (graded rewards)")
        advantages = batch.group_advantages[:, None].expand_as(student.logprobs)
        result = masked_policy_gradient("grpo", advantages, student_sampled(batch), student, batch, self.settings)
        result.metrics["grpo/reward_mean"] = Metric(value=float(batch.rewards.mean()), weight=float(batch.num_rows))
        return result
