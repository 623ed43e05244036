"""Which responses a step trains on: student samples, continuations of teacher prefixes (TrOPD guidance,
algorithms §3), whole teacher responses (`sft`, generated once per prompt and cached), or dataset
responses (GKD's off-policy share). Grading, and the GRPO advantages of its rewards, happen here too (`grade`),
once per batch.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import torch

from opd.functional import grpo_advantages
from opd.grading.graders import Grader, failure_count
from opd.rollout.batch import Responses, SamplingSettings, build_batch, concatenate, fixed_responses, sample_batch
from opd.runtime import distributed
from opd.types import RolloutBatch


@dataclass(frozen=True, kw_only=True, slots=True)
class CollectSettings:
    prompts_per_step: int  # over all processes; each rank collects its contiguous share
    shuffle: bool
    guidance: bool
    guidance_fraction: float
    max_prefix_tokens: int  # the cosine schedule's starting maximum
    total_steps: int
    teacher_written: bool  # sft: every response is the teacher's
    onpolicy_fraction: float  # gkd: share of prompts answered by the student
    seed: int


def max_prefix_length(step: int, total_steps: int, start: int) -> int:
    """Cosine-annealed maximum prefix length: `start` at step 0, 0 at the last step (training ends on-policy)."""
    if total_steps <= 1:
        return 0
    progress = min(step / (total_steps - 1), 1.0)
    return int(math.floor(start * 0.5 * (1.0 + math.cos(math.pi * progress))))


def draw_prefix(teacher_response: list[int], limit: int, end_ids: tuple[int, ...], rng: random.Random) -> list[int]:
    """A prefix of length l ~ Uniform{0..min(limit, len)}; a final end-of-sequence token is never included,
    so the student always writes the ending itself."""
    usable = teacher_response[:-1] if teacher_response and teacher_response[-1] in end_ids else teacher_response
    length = rng.randint(0, min(limit, len(usable)))
    return usable[:length]


def rollout_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a step's served and noise draws on one rank (even: the student's; + 1: a teacher writer's)."""
    return (((seed * 1_000_003 + step) * 1024 + rank) * 2) % 2**62


def collect(run, step: int, indices: list[int], teacher_responses: dict[int, list[list[int]]]) -> RolloutBatch:
    """The step's RolloutBatch for dataset rows `indices` (each repeated samples_per_prompt times).

    `teacher_responses` is sft's cache (row -> its samples' teacher responses), filled on first visit; it is
    training state (TrainState), so a resumed run reuses it.
    """
    settings = run.collect
    sampling = dataclasses.replace(run.sampling, seed=rollout_seed(settings.seed, distributed.rank(), step))
    n = sampling.samples_per_prompt
    prompts = [run.prompt_ids[i] for i in indices for _ in range(n)]
    rows = [i for i in indices for _ in range(n)]
    domains = [run.rows[i].domain for i in rows]
    rng = random.Random(settings.seed * 1_000_003 + step)
    if settings.teacher_written:
        _fill_teacher_cache(run, indices, teacher_responses, sampling)
        responses = fixed_responses([teacher_responses[i][k] for i in indices for k in range(n)], sampling,
                                    from_teacher=True)
        return build_batch(prompts, rows, domains, responses, sampling, step=step)
    if settings.onpolicy_fraction < 1.0:
        return _mixed_with_dataset(run, prompts, rows, domains, step, settings, rng, sampling)
    prefixes = None
    if settings.guidance:
        limit = max_prefix_length(step, settings.total_steps, settings.max_prefix_tokens)
        guided = [k < round(settings.guidance_fraction * n) for _ in indices for k in range(n)]
        written = _teacher_responses(run, [r for r, g in zip(rows, guided) if g],
                                     [d for d, g in zip(domains, guided) if g], sampling)
        written_iter = iter(written)
        prefixes = [draw_prefix(next(written_iter), limit, sampling.end_of_sequence_ids, rng) if g else []
                    for g in guided]
    return sample_batch(run.sampler, prompts, rows, domains, sampling, step=step, prefixes=prefixes)


def _teacher_responses(run, rows: list[int], domains: list[str], sampling: SamplingSettings) -> list[list[int]]:
    """One full teacher sample per row, each from its domain's teacher reading its own prompt rendering."""
    out: dict[int, list[int]] = {}
    for domain in sorted(set(domains)):
        positions = [p for p, d in enumerate(domains) if d == domain]
        scorer = run.scorers[domain]
        own = scorer.teacher_prompts
        prompts = [own[rows[p]] if own is not None else run.prompt_ids[rows[p]] for p in positions]
        # A teacher's writer draws its own seeds, not the student's (rollout_seed's odd seeds).
        responses = scorer.writer.sample(prompts, dataclasses.replace(sampling, seed=sampling.seed + 1))
        for p, ids, mask in zip(positions, responses.ids, responses.mask, strict=True):
            out[p] = ids[mask].tolist()
    return [out[p] for p in range(len(rows))]


def _fill_teacher_cache(run, indices: list[int], cache: dict, sampling: SamplingSettings) -> None:
    """sft's teacher trajectories: generated the first time a prompt is visited, then reused. All of a
    step's new prompts are generated in one batch (one prompt at a time made sft 3x slower than OPD)."""
    n = run.sampling.samples_per_prompt
    new = list(dict.fromkeys(i for i in indices if i not in cache))
    if not new:
        return
    rows = [i for i in new for _ in range(n)]
    written = _teacher_responses(run, rows, [run.rows[i].domain for i in rows], sampling)
    for position, row in enumerate(new):
        cache[row] = written[position * n:(position + 1) * n]


def _mixed_with_dataset(run, prompts, rows, domains, step, settings: CollectSettings, rng,
                        sampling: SamplingSettings) -> RolloutBatch:
    """GKD's lambda: each prompt is answered by the student with probability onpolicy_fraction, else by the
    dataset's `response` (its samples all use that one response)."""
    n = sampling.samples_per_prompt
    from_dataset = []
    for start in range(0, len(rows), n):
        choice = rng.random() >= settings.onpolicy_fraction
        from_dataset.extend([choice] * n)
    parts, order = [], []
    student_rows = [p for p, d in enumerate(from_dataset) if not d]
    dataset_rows = [p for p, d in enumerate(from_dataset) if d]
    if student_rows:
        parts.append(run.sampler.sample([prompts[p] for p in student_rows], sampling))
        order.extend(student_rows)
    if dataset_rows:
        answers = [run.dataset_responses[rows[p]] for p in dataset_rows]
        parts.append(fixed_responses(answers, sampling, from_teacher=False))
        order.extend(dataset_rows)
    merged = concatenate(parts, sampling.pad_id)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    responses = Responses(**{f.name: None if getattr(merged, f.name) is None else getattr(merged, f.name)[inverse]
                             for f in dataclasses.fields(Responses)})
    return build_batch(prompts, rows, domains, responses, sampling, step=step,
                       from_dataset=torch.tensor(from_dataset))


def grade(batch: RolloutBatch, graders: dict[str, Grader], rows, tokenizer, group_size: int) -> RolloutBatch:
    """The batch with every response graded by its domain's grader (rewards [N] in [0, 1]) and the GRPO
    advantages of those rewards (groups: a prompt's consecutive samples). A domain without a grader is an
    error when others have one: grpo needs all."""
    rewards = torch.zeros(batch.num_rows)
    failed = torch.zeros(batch.num_rows, dtype=torch.bool)
    for row in range(batch.num_rows):
        domain = batch.domain[row]
        if domain not in graders:
            raise ValueError(f"domain '{domain}' has no grader (teachers.*.grader), but others do: grade all or none")
        completion = tokenizer.decode(batch.response_ids[row][batch.response_mask[row]], skip_special_tokens=True)
        # A grade that could not be computed (a timeout, a dead worker) is a 0 and a warning; counting them
        # per row makes them a metric of the step (grading runs in this thread, one row at a time).
        before = failure_count()
        rewards[row] = graders[domain](rows[batch.prompt_index[row]], completion)
        failed[row] = failure_count() > before
    return attach_rewards(batch, rewards, group_size, failed)


def attach_rewards(batch: RolloutBatch, rewards: torch.Tensor, group_size: int,
                   failed: torch.Tensor | None = None) -> RolloutBatch:
    """The batch with graded rewards and their GRPO advantages (groups: a prompt's consecutive samples)."""
    return dataclasses.replace(batch, rewards=rewards, group_advantages=grpo_advantages(rewards, group_size),
                               grading_failed=failed)
