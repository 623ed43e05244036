"""A few of a step's rollouts, token by token, for samples.jsonl (train.log_samples_every).

Every value comes from the step itself, nothing is recomputed: lS from the training forward, lOld from the
sampler, lT and lR from the scores the objective trained on, and the advantage, trust probability and
outlier flag from the objective's own `TokenLoss.diagnostics`. A value the step does not have is null: a
domain without a teacher, no reference, an objective without that diagnostic (the KL family has no
advantage), a token outside the objective's selection, lOld of a token the student did not sample (a
teacher prefix, sft's teacher response, gkd's dataset answer).

With several processes only the main one records, from its own rows: the other ranks' rows are not
gathered (a sample is for reading, not a statistic; the metrics cover every rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from opd.types import TOKEN_DIAGNOSTICS, RolloutBatch, TeacherScores

# One record per logged rollout (see `sample_record` for the fields).
SampleSink = Callable[[int, list[dict]], None]


def is_sample_step(every: int, step: int) -> bool:
    """Whether step `step` (1-based, as metrics.jsonl numbers it) logs samples; `every` 0 never does."""
    return every > 0 and step % every == 0


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleRequest:
    """What the loop asks of one step: `per_domain` rollouts of each domain, handed to `write`."""

    per_domain: int
    write: SampleSink  # (step, records)


@dataclass(kw_only=True, slots=True)
class TokenRecord:
    """The per-token values of one step, filled micro-batch by micro-batch by the training step (the one
    mutable collector: kept only on sample steps, so other steps copy nothing off the device)."""

    student_logprobs: list[Tensor] = field(default_factory=list)  # per micro-batch [n, T] float32
    diagnostics: list[Mapping[str, Tensor]] = field(default_factory=list)  # per micro-batch, name -> [n, T]
    rows: list[Tensor] = field(default_factory=list)  # per micro-batch, its rows of the batch [n]

    def add(self, student_logprobs: Tensor, diagnostics: Mapping[str, Tensor], rows: Tensor) -> None:
        self.student_logprobs.append(student_logprobs.detach().float().cpu())
        self.diagnostics.append({name: values.detach().float().cpu() for name, values in diagnostics.items()})
        self.rows.append(rows)

    def joined(self) -> tuple[Tensor, dict[str, Tensor]]:
        """lS [N, T] and each diagnostic [N, T] over the whole batch, in its row order (nan in a micro-batch
        that lacks it)."""
        restore = torch.argsort(torch.cat(self.rows))  # micro-batches may hold rows out of order
        names = sorted({name for part in self.diagnostics for name in part})
        joined = {name: torch.cat([part[name] if name in part else torch.full(logprobs.shape, math.nan)
                                   for part, logprobs in zip(self.diagnostics, self.student_logprobs)])[restore]
                  for name in names}
        return torch.cat(self.student_logprobs)[restore], joined


def sample_rows(domains: tuple[str, ...], per_domain: int) -> list[int]:
    """The first `per_domain` rows of each domain, in row order (deterministic: a resumed run logs the same)."""
    taken: dict[str, int] = {}
    rows = []
    for row, domain in enumerate(domains):
        if taken.get(domain, 0) < per_domain:
            taken[domain] = taken.get(domain, 0) + 1
            rows.append(row)
    return rows


def sample_records(step: int, batch: RolloutBatch, teacher: TeacherScores, record: TokenRecord, tokenizer,
                   per_domain: int) -> list[dict]:
    """One JSON-ready record per chosen rollout."""
    student_logprobs, diagnostics = record.joined()
    return [sample_record(step, row, batch, teacher, student_logprobs, diagnostics, tokenizer)
            for row in sample_rows(batch.domain, per_domain)]


def sample_record(step: int, row: int, batch: RolloutBatch, teacher: TeacherScores, student_logprobs: Tensor,
                  diagnostics: Mapping[str, Tensor], tokenizer) -> dict:
    """step, domain, prompt and response text, and per response token its text and every value of the step."""
    positions = batch.response_mask[row].nonzero().flatten().tolist()
    response_ids = batch.response_ids[row, positions].tolist()
    has_teacher = bool(teacher.has_teacher[row])
    has_reference = teacher.ref_logprobs is not None and bool(teacher.has_reference[row])
    sampled = batch.sampled_by_student[row]
    tokens = []
    for position, token_id in zip(positions, response_ids):
        token = {
            "id": token_id,
            "text": tokenizer.decode([token_id]),
            "lS": _number(student_logprobs[row, position]),
            "lOld": _number(batch.sampler_logprobs[row, position]) if sampled[position] else None,
            "lT": _number(teacher.logprobs[row, position]) if has_teacher else None,
            "lR": _number(teacher.ref_logprobs[row, position]) if has_reference else None,
            "from_teacher": bool(batch.from_teacher[row, position]),
        }
        for name in TOKEN_DIAGNOSTICS:
            token[name] = _number(diagnostics[name][row, position]) if name in diagnostics else None
        if token["outlier"] is not None:
            token["outlier"] = token["outlier"] > 0.5
        tokens.append(token)
    return {
        "step": step,
        "domain": batch.domain[row],
        "prompt_index": batch.prompt_index[row],
        "prompt": tokenizer.decode(batch.prompt_ids[row][batch.prompt_mask[row]].tolist()),
        "response": tokenizer.decode(response_ids),
        "truncated": bool(batch.truncated[row]),
        "reward": _number(batch.rewards[row]) if batch.rewards is not None else None,
        "tokens": tokens,
    }


def _number(value: Tensor) -> float | None:
    """A JSON number; nan (a value that does not apply) becomes null."""
    number = float(value)
    return number if math.isfinite(number) else None
