"""Training: the loop, and one on-policy distillation step. Read top to bottom:

    train (start-up checks, assemble)  ->  the loop (resume, log, evaluate, checkpoint)  ->  run_one_step:
    collect (student samples, teacher prefixes, ...)  ->  grade (if graders)  ->  score (teachers,
    references)  ->  train_step (forward, loss, backward, finite check, optimizer step)  ->  sync the sampler

run_one_step is `consume(produce(...))`: produce is the rollout half (collect, grade, score), consume the
training half (train_step, sync). With rollout.async a rollout thread runs produce for the steps ahead
(pipelined.py) and the loop runs run_pipelined_step, which consumes the thread's batches.

Reduction happens once, in `aggregate`, with a denominator counted over the whole optimizer batch before
the micro-batch loop: the gradient does not depend on micro_batch_size. A step reads only the `Run` that
assemble.py built and the `TrainState`; the loop reads the config for what happens between steps.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from opd.aggregate import aggregate, count_denominator
from opd.assemble import Run, StepSettings, assemble, seed_everything
from opd.checks import check_launch
from opd.collect import collect, grade, max_prefix_length
from opd.config import Config, OptimConfig, to_dict
from opd.data import prompts_for_step
from opd.evaluate.run import EvalSettings, evaluate
from opd.evaluate.sampling import EvalBackend
from opd.metrics import as_floats, combine, rollout_metrics, topk_metrics
from opd.objectives import Objective
from opd.packing import forward_tokens, shortest_first, token_budget_slices
from opd.pipelined import RolloutPipeline, ScoredBatch, check_staleness
from opd.runtime import distributed
from opd.runtime.checkpoint import (
    CheckpointRecord,
    latest_checkpoint,
    load_checkpoint_state,
    load_rank_state,
    save_checkpoint,
    save_final,
    save_model_atomically,
)
from opd.runtime.monitor import MetricsLogger
from opd.runtime.wandb_sink import WandbSink
from opd.runtime.run_folder import clean_leftovers, segment_config_name, write_text_atomically
from opd.samples import SampleRequest, TokenRecord, is_sample_step, sample_records
from opd.scoring import output_head, response_hidden_states, scatter_tokens, student_token_scores
from opd.served.client import ServerUnavailable
from opd.teachers import score_batch
from opd.types import Metric, Reduce, RolloutBatch, Signal, StudentOutputs, TeacherScores, select_rows, to_device


@dataclass(kw_only=True, slots=True)
class TrainState:
    """Everything a resumed run needs besides the Run: the model, the optimizer and the counters."""

    student: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0  # optimizer steps completed (skipped ones included)
    skipped_steps: int = 0  # steps whose gradient was not finite
    # sft's teacher responses, generated once per prompt (row -> one response per sample); per rank.
    teacher_responses: dict[int, list[list[int]]] = field(default_factory=dict)


# --------------------------------------------------------------------------- the loop


def train(config: Config, *, resume: bool = False, allow_config_change: bool = False) -> Path:
    """Train the student; returns the folder of the final model (a save_pretrained folder).

    A resume must keep the recorded config, apart from how the run is carried out (checks.RESUMABLE_KEYS),
    unless `allow_config_change`; each segment's config is recorded beside the first's."""
    checkpoint = latest_checkpoint(Path(config.train.output_dir))
    changed = check_launch(config, world_size=distributed.world_size(), cuda=torch.cuda.is_available(),
                           resume=resume, checkpoint=checkpoint, allow_config_change=allow_config_change)
    if changed and distributed.is_main():
        print(f"opd: note: resuming with changed {', '.join(changed)} (--allow-config-change)", file=sys.stderr)
    seed_everything(config.train.seed + distributed.rank())
    run = assemble(config, checkpoint)
    try:
        return _train(run, config, checkpoint)
    finally:
        run.close()


def _train(run: Run, config: Config, checkpoint: Path | None) -> Path:
    run_dir = Path(config.train.output_dir)
    distributed.shard_student(run.student)  # before the optimizer: FSDP2 replaces parameters by shards
    state = TrainState(student=run.student, optimizer=build_optimizer(run.student, config.optim))
    if checkpoint is not None:
        record = load_checkpoint_state(checkpoint, state.student, state.optimizer)
        state.step, state.skipped_steps = record.step, record.skipped_steps
        state.teacher_responses = load_rank_state(checkpoint).get("teacher_responses", {})
    run.sampler.sync(state.student)  # a resumed student, a LoRA student's merged weights
    first_step, skipped_before = state.step, state.skipped_steps
    logger = None
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_leftovers(run_dir)  # what a killed segment left half-written or half-deleted
        # Each segment's own file: what the steps before this one ran with stays on record.
        write_text_atomically(run_dir / segment_config_name(state.step), yaml.safe_dump(to_dict(config),
                                                                                       sort_keys=False))
        logger = MetricsLogger(run_dir, total_steps=config.train.steps, start_step=state.step,
                               tensorboard=config.train.tensorboard, progress=config.train.progress,
                               log_every=config.train.log_every, wandb=_wandb_sink(config, run_dir))
    try:
        with _rollout_thread(run, config, state) as pipeline:
            while state.step < config.train.steps:
                set_learning_rate(state.optimizer, config.optim, state.step, config.train.steps)
                samples = _sample_request(logger, config, state.step + 1)
                with _autocast(config.train.mixed_precision), _naming_the_step(state.step + 1):
                    if pipeline is None:
                        values = run_one_step(run, state, samples)
                    else:
                        values = run_pipelined_step(run, state, pipeline, samples)
                if config.eval.every and state.step % config.eval.every == 0:
                    values.update(evaluate_during_training(state.student, run.tokenizer, config, run_dir,
                                                           state.step))
                if logger is not None:
                    logger.log(state.step, values)
                if _should_save(state.step, config):
                    save_checkpoint(run_dir, state.student, run.tokenizer, state.optimizer,
                                    CheckpointRecord(
                                        step=state.step, skipped_steps=state.skipped_steps,
                                        data_position=state.step * config.rollout.prompts_per_step),
                                    keep=config.train.keep_checkpoints,
                                    # a copy: the rollout thread may add sft's responses for the steps ahead
                                    rank_state={"teacher_responses": dict(state.teacher_responses)})
    finally:
        if logger is not None:
            logger.close()
    refuse_if_every_step_skipped(state, first_step, skipped_before)
    return save_final(run_dir, state.student, run.tokenizer, state.step)


def _rollout_thread(run: Run, config: Config, state: TrainState):
    """With rollout.async, the rollout thread producing the steps ahead (pipelined.py); else nothing."""
    if not config.rollout.async_:
        return contextlib.nullcontext(None)

    def produce_on_thread(step: int, weight_version: int) -> ScoredBatch:
        with _autocast(config.train.mixed_precision):  # autocast is per thread
            return produce(run, step, state.teacher_responses, weight_version=weight_version)

    return RolloutPipeline(produce_on_thread, first_version=state.step, last_step=config.train.steps,
                           max_staleness=config.rollout.max_staleness)


@contextlib.contextmanager
def _naming_the_step(step: int):
    """A served model that stays down fails the step, never fills in a score; the message says where to go on."""
    try:
        yield
    except ServerUnavailable as error:
        raise ServerUnavailable(f"step {step}: {error}. Nothing of this step was trained; `opd train ... --resume` "
                                f"continues from the last checkpoint once the server is back") from None


# --------------------------------------------------------------------------- one step


def run_one_step(run: Run, state: TrainState, samples: SampleRequest | None = None) -> dict[str, float]:
    """The synchronous step: produce this rank's scored batch, then consume it (train, sync); the metrics as
    floats. With `samples` (a sample step, on the main process) a few of this rank's rollouts go to
    samples.write token by token."""
    started = time.perf_counter()
    scored = produce(run, state.step + 1, state.teacher_responses, weight_version=state.step)

    def sync() -> float:
        run.sampler.sync(state.student)  # the next step samples from the updated policy
        return 0.0

    return consume(run, state, scored, samples, started=started, sync=sync)


def produce(run: Run, step: int, teacher_responses: dict[int, list[list[int]]], *,
            weight_version: int) -> ScoredBatch:
    """The rollout half of step `step` (1-based): collect, grade and score this rank's share of its prompts,
    sampled with the weights of `weight_version` optimizer steps. On the rollout thread when async."""
    started = time.perf_counter()
    settings = run.collect
    indices = prompts_for_step(len(run.rows), step - 1, settings.prompts_per_step, settings.seed, settings.shuffle)
    share = len(indices) // distributed.world_size()  # this rank's contiguous share of the step's prompts
    indices = indices[distributed.rank() * share : (distributed.rank() + 1) * share]
    batch = collect(run, step - 1, indices, teacher_responses)
    if run.graders:
        batch = grade(batch, run.graders, run.rows, run.tokenizer, run.sampling.samples_per_prompt)
    rolled = time.perf_counter()
    teacher = score_batch(batch, run.scorers, run.scoring)
    return ScoredBatch(step=step, weight_version=weight_version, batch=batch, teacher=teacher,
                       rollout_seconds=rolled - started, score_seconds=time.perf_counter() - rolled)


def consume(run: Run, state: TrainState, scored: ScoredBatch, samples: SampleRequest | None = None, *,
            started: float, sync: Callable[[], float]) -> dict[str, float]:
    """The training half: train on `scored`, then `sync` the sampler (it returns the seconds it waited for
    the rollout thread before syncing); `started` is when the step began, for the throughput."""
    trained_from = time.perf_counter()
    batch, teacher = scored.batch, scored.teacher
    record = TokenRecord() if samples is not None else None
    metrics = train_step(state, batch, teacher, run.objective, run.step, record=record)
    sync_wait = sync()
    finished = time.perf_counter()
    if samples is not None:
        samples.write(state.step, sample_records(state.step, batch, teacher, record, run.tokenizer,
                                                 samples.per_domain))
    values = as_floats(metrics)
    if run.collect.guidance:
        values["guidance/max_prefix_length"] = float(
            max_prefix_length(scored.step - 1, run.collect.total_steps, run.collect.max_prefix_tokens))
    values.update({
        "perf/rollout_seconds": scored.rollout_seconds,
        "perf/score_seconds": scored.score_seconds,
        "perf/train_seconds": finished - trained_from - sync_wait,  # the sampler's weight sync included
        "perf/step_seconds": finished - started,
        "perf/tokens_per_second": distributed.all_reduce_sum(float(batch.response_mask.sum())) / (finished - started),
    })
    return values


def run_pipelined_step(run: Run, state: TrainState, pipeline: RolloutPipeline,
                       samples: SampleRequest | None = None) -> dict[str, float]:
    """The asynchronous step: take the rollout thread's batch (refused if staler than allowed), consume it,
    and hand the servers the new weights when the schedule allows (pipelined.py)."""
    started = time.perf_counter()
    scored, waited = pipeline.next_batch(state.step + 1)
    staleness = check_staleness(scored, state.step, pipeline.max_staleness)
    sync_waits: list[float] = []

    def sync() -> float:
        sync_waits.append(pipeline.sync(state.step, lambda: run.sampler.sync(state.student)))
        return sync_waits[-1]

    values = consume(run, state, scored, samples, started=started, sync=sync)
    finished = time.perf_counter()
    values.update({
        # One weight version per batch: a rank's rows share its staleness. Every rank's batch counts (each
        # process has its own rollout thread).
        "async/staleness_mean": distributed.all_reduce_sum(float(staleness)) / distributed.world_size(),
        "async/staleness_max": float(distributed.all_reduce_max(staleness)),
        # waited for its batch, and before syncing for the rollouts the schedule has sampled with the old weights
        "perf/trainer_wait_seconds": waited + sync_waits[0],
        "perf/generation_wait_seconds": scored.generation_wait_seconds,
        "perf/engine_busy_fraction": pipeline.busy_fraction(started, finished),
    })
    return values


def train_step(state: TrainState, batch: RolloutBatch, teacher: TeacherScores, objective: Objective,
               settings: StepSettings, *, record: TokenRecord | None = None) -> dict[str, Metric]:
    """One optimizer step on a scored rollout batch; `record` collects this rank's per-token values."""
    metrics, logprobs, entropy = accumulate_gradients(state.student, batch, teacher, objective, settings,
                                                      record=record)
    metrics.update(rollout_metrics(batch, teacher, logprobs, entropy))
    metrics = combine(distributed.gather_objects(metrics))  # every rank's rows
    metrics.update(apply_update(state, settings.max_grad_norm))
    return metrics


def accumulate_gradients(model: nn.Module, batch: RolloutBatch, teacher: TeacherScores, objective: Objective,
                         settings: StepSettings, *, record: TokenRecord | None = None,
                         ) -> tuple[dict[str, Metric], Tensor, Tensor]:
    """Forward + backward over micro-batches; returns metrics and the batch's detached lS and entropy [N, T].

    `record` (a sample step) gets each micro-batch's lS and the objective's per-token diagnostics."""
    # The whole optimizer batch: every micro-batch on every rank divides by the same number.
    denominator = distributed.all_reduce_sum(count_denominator(batch.response_mask, settings.aggregation))
    metric_sets, logprobs, entropies = [], [], []
    parts = micro_batch_rows(batch, settings)
    for rows in parts:
        micro_batch = to_device(select_rows(batch, rows), model.device)
        micro_teacher = to_device(select_rows(teacher, rows), model.device)
        student = student_forward(model, micro_batch, micro_teacher, objective, settings)
        token_loss = objective(student, micro_batch, micro_teacher)
        loss = aggregate(token_loss.per_token, micro_batch.response_mask, settings.aggregation, denominator)
        loss.backward()
        metric_sets.append({**token_loss.metrics, **topk_metrics(student, micro_batch, micro_teacher),
                            "loss": Metric(value=float(loss.detach()), reduce=Reduce.SUM)})
        logprobs.append(student.logprobs.detach().cpu())
        entropies.append(student.entropy.cpu())
        if record is not None:
            record.add(student.logprobs, token_loss.diagnostics, rows)
    distributed.synchronize_replicated_gradients(model)
    restore = torch.argsort(torch.cat(parts))  # the batch's row order again
    return combine(metric_sets), torch.cat(logprobs)[restore], torch.cat(entropies)[restore]


def micro_batch_rows(batch: RolloutBatch, settings: StepSettings) -> list[Tensor]:
    """Each micro-batch's row indices [n]: micro_batch_size rows, or filled up to micro_batch_tokens. With
    group_by_length and more than one micro-batch, the rows are taken shortest first (prompt + response
    tokens), so that each micro-batch holds rows of similar length and its forward runs at their width."""
    parts = _consecutive(batch, settings, torch.arange(batch.num_rows))
    if settings.group_by_length and len(parts) > 1:
        parts = _consecutive(batch, settings, shortest_first(batch.prompt_mask, batch.response_mask))
    return parts


def _consecutive(batch: RolloutBatch, settings: StepSettings, order: Tensor) -> list[Tensor]:
    """Rows `order` cut in turn into micro-batches of micro_batch_size rows or micro_batch_tokens tokens."""
    if settings.micro_batch_tokens is None:
        return list(order.split(settings.micro_batch_size))
    row_tokens = forward_tokens(batch.prompt_mask[order], batch.response_mask[order], settings.packed)
    return [order[part] for part in token_budget_slices(row_tokens, settings.micro_batch_tokens)]


def student_forward(model: nn.Module, batch: RolloutBatch, teacher: TeacherScores, objective: Objective,
                    settings: StepSettings) -> StudentOutputs:
    """lS of the response tokens (and at the teacher's top-k ids if the objective needs them), chunked.

    `batch` and `teacher` are already on the model's device.
    """
    mask = batch.response_mask
    hidden = response_hidden_states(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, mask,
                                    packed=settings.packed)
    weight, bias = output_head(model)
    gather_ids = teacher.topk_ids[mask] if Signal.TEACHER_TOPK in objective.needs else None
    # The HF sampler recorded the entropy of the distribution it drew from (the student's); the forward
    # computes it only where there is no record: a vLLM rollout, or tokens the student was given (teacher
    # prefixes, sft's teacher responses, gkd's dataset answers), which carry 0 in the record.
    recorded = batch.sampler_entropy
    sampled = batch.sampled_by_student
    # The student's own top-k (for the top-k overlap metric) comes from the logits each chunk computes anyway.
    logprobs, topk_logprobs, computed, own_topk = student_token_scores(
        hidden[mask], weight, bias, batch.response_ids[mask], gather_ids,
        temperature=settings.temperature, chunk_size=settings.chunk_size,
        with_entropy=recorded is None or bool((mask & ~sampled).any()), with_own_topk=gather_ids is not None,
    )
    entropy = recorded
    if computed is not None:
        entropy = scatter_tokens(computed, mask)
        if recorded is not None:  # the sampler's record where it sampled (its top-p distribution)
            entropy = torch.where(sampled, recorded, entropy)
    full = Signal.FULL_DISTRIBUTIONS in objective.needs
    return StudentOutputs(
        logprobs=scatter_tokens(logprobs, mask),
        entropy=entropy,
        topk_logprobs=scatter_tokens(topk_logprobs, mask) if topk_logprobs is not None else None,
        topk_ids=scatter_tokens(own_topk, mask) if own_topk is not None else None,
        hidden=hidden if full else None,
        head=(weight, bias) if full else None,
    )


def apply_update(state: TrainState, max_grad_norm: float | None) -> dict[str, Metric]:
    """Clip, check the gradient is finite, and step; a non-finite gradient skips the step and is counted."""
    parameters = [p for p in state.student.parameters() if p.requires_grad]
    grad_norm = distributed.clip_gradients(parameters, max_grad_norm if max_grad_norm is not None else math.inf)
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        state.optimizer.step()
    else:
        state.skipped_steps += 1
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return {
        "optim/grad_norm": Metric(value=float(grad_norm), reduce=Reduce.MAX),
        "optim/skipped_steps": Metric(value=float(state.skipped_steps), reduce=Reduce.MAX),
        "optim/lr": Metric(value=state.optimizer.param_groups[0]["lr"], reduce=Reduce.MAX),
    }


# --------------------------------------------------------------------------- between steps


class EveryStepSkipped(ValueError):
    """A run whose every step was skipped trained nothing: reported like a config problem (one `opd:`
    line, a non-zero exit), and no final/ student is written."""


def refuse_if_every_step_skipped(state: TrainState, first_step: int, skipped_before: int) -> None:
    """Raise when every step since `first_step` (where this process started or resumed) was skipped, or
    every step of the whole run (a resume with no step left to run)."""
    for steps, skipped in ((state.step - first_step, state.skipped_steps - skipped_before),
                           (state.step, state.skipped_steps)):
        if steps > 0 and skipped == steps:
            raise EveryStepSkipped(
                f"every one of the {steps} step(s) of this run was skipped: the gradient was not finite (nan or "
                "inf) each time, so the student did not change and no final/ model was written. Look for "
                "non-finite losses (optim/grad_norm and the objective's metrics in metrics.jsonl)")


def _wandb_sink(config: Config, run_dir: Path) -> WandbSink | None:
    settings = config.train.wandb
    if settings is None:
        return None
    return WandbSink(project=settings.project, name=settings.name, mode=settings.mode, run_dir=str(run_dir),
                     config=to_dict(config))


def evaluate_during_training(student: nn.Module, tokenizer, config: Config, run_dir: Path,
                             step: int) -> dict[str, float]:
    """Write the current student to run_dir/eval_model and run `opd eval`'s pipeline on it (rank 0)."""
    folder = run_dir / "eval_model"
    save_model_atomically(student, tokenizer, folder, step)  # every rank takes part in gathering a sharded student
    values: dict[str, float] = {}
    if distributed.is_main():
        settings = EvalSettings(samples=config.eval.samples, temperature=config.eval.temperature,
                                max_new_tokens=config.eval.max_new_tokens, limit=config.eval.limit,
                                chat_template_kwargs=config.student.chat_template_kwargs)
        results = evaluate(list(config.eval.benchmarks), settings, str(run_dir / "eval"), model_dir=str(folder),
                           backend=EvalBackend())
        for name, result in results["benchmarks"].items():
            values[f"eval/{name}/avg_at_k"] = result["avg_at_k"]
        for domain, value in results["domains"].items():
            values[f"eval/{domain}/average"] = value
    distributed.barrier()
    return values


def _sample_request(logger: MetricsLogger | None, config: Config, step: int) -> SampleRequest | None:
    """On the main process (the one with a logger), at every train.log_samples_every-th step."""
    if logger is None or not is_sample_step(config.train.log_samples_every, step):
        return None
    return SampleRequest(per_domain=config.train.log_samples_per_domain, write=logger.log_samples)


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(parameters, lr=config.lr, betas=config.betas, eps=config.eps,
                             weight_decay=config.weight_decay)


def learning_rate(config: OptimConfig, step: int, total_steps: int) -> float:
    """constant, or linear warmup then cosine decay to lr * min_lr_ratio at the last step."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    decay_steps = max(total_steps - config.warmup_steps - 1, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def set_learning_rate(optimizer: torch.optim.Optimizer, config: OptimConfig, step: int, total_steps: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step, total_steps)


def _autocast(mode: str):
    if mode == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _should_save(step: int, config: Config) -> bool:
    every = config.train.save_every
    return step == config.train.steps or (every > 0 and step % every == 0)


class _CallableModule(types.ModuleType):
    """`opd.train(config)`: importing the submodule `opd.train` makes it the package's `train` attribute,
    which would shadow a function of that name, so the module itself calls `train`."""

    def __call__(self, config: Config, **options) -> Path:
        return train(config, **options)


sys.modules[__name__].__class__ = _CallableModule
