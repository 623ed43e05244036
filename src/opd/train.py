"""One on-policy distillation step, and the loop around it. Read top to bottom.

    collect (student samples, teacher prefixes, ...)  ->  grade (if graders)  ->  score (teachers,
    references)  ->  train_step (forward, loss, backward, finite check, optimizer step)  ->  log
    ->  maybe evaluate  ->  maybe checkpoint

Reduction happens once, in `aggregate`, with a denominator counted over the whole optimizer batch before
the micro-batch loop: the gradient does not depend on micro_batch_size.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from opd.runtime import distributed
from opd.aggregate import aggregate, count_denominator
from opd.assemble import Run, assemble, seed_everything
from opd.runtime.checkpoint import (
    CheckpointRecord,
    latest_checkpoint,
    load_checkpoint_state,
    load_rank_state,
    save_checkpoint,
    save_model,
)
from opd.config import Config, OptimConfig, to_dict
from opd.data import prompts_for_step
from opd.metrics import as_floats, combine, rollout_metrics
from opd.runtime.monitor import MetricsLogger
from opd.collect import CollectSettings, attach_rewards, collect, max_prefix_length
from opd.objectives import Objective
from opd.scoring import output_head, response_hidden_states, scatter_tokens, student_token_logprobs
from opd.teachers import score_batch
from opd.types import Metric, Reduce, RolloutBatch, Signal, StudentOutputs, TeacherScores


@dataclass(frozen=True, kw_only=True, slots=True)
class StepSettings:
    aggregation: str
    micro_batch_size: int
    temperature: float  # the student's log-probs are taken at its sampling temperature
    chunk_size: int
    max_grad_norm: float | None


@dataclass(kw_only=True, slots=True)
class TrainState:
    student: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0  # optimizer steps completed (skipped ones included)
    skipped_steps: int = 0  # steps whose gradient was not finite


# --------------------------------------------------------------------------- one step


def student_forward(model: nn.Module, batch: RolloutBatch, teacher: TeacherScores, objective: Objective,
                    settings: StepSettings) -> StudentOutputs:
    """lS of the response tokens (and at the teacher's top-k ids if the objective needs them), chunked.

    `batch` and `teacher` are already on the model's device.
    """
    mask = batch.response_mask
    hidden = response_hidden_states(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, mask)
    weight, bias = output_head(model)
    gather_ids = teacher.topk_ids[mask] if Signal.TEACHER_TOPK in objective.needs else None
    # The HF sampler recorded the entropy of the distribution it drew from (the student's); the forward
    # computes it only where there is no record: a vLLM rollout, or tokens the student was given (teacher
    # prefixes, sft's teacher responses, gkd's dataset answers), which carry 0 in the record.
    recorded = batch.sampler_entropy
    sampled = batch.sampled_by_student
    logprobs, topk_logprobs, computed = student_token_logprobs(
        hidden[mask], weight, bias, batch.response_ids[mask], gather_ids,
        temperature=settings.temperature, chunk_size=settings.chunk_size,
        with_entropy=recorded is None or bool((mask & ~sampled).any()),
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
        hidden=hidden if full else None,
        head=(weight, bias) if full else None,
    )


def accumulate_gradients(model: nn.Module, batch: RolloutBatch, teacher: TeacherScores, objective: Objective,
                         settings: StepSettings) -> tuple[dict[str, Metric], Tensor, Tensor]:
    """Forward + backward over micro-batches; returns metrics and the batch's detached lS and entropy [N, T]."""
    # The whole optimizer batch: every micro-batch on every rank divides by the same number.
    denominator = distributed.all_reduce_sum(count_denominator(batch.response_mask, settings.aggregation))
    metric_sets, logprobs, entropies = [], [], []
    for start in range(0, batch.num_rows, settings.micro_batch_size):
        rows = slice(start, start + settings.micro_batch_size)
        micro_batch = to_device(select_rows(batch, rows), model.device)
        micro_teacher = to_device(select_rows(teacher, rows), model.device)
        student = student_forward(model, micro_batch, micro_teacher, objective, settings)
        token_loss = objective(student, micro_batch, micro_teacher)
        loss = aggregate(token_loss.per_token, micro_batch.response_mask, settings.aggregation, denominator)
        loss.backward()
        metric_sets.append({**token_loss.metrics, "loss": Metric(value=float(loss.detach()), reduce=Reduce.SUM)})
        logprobs.append(student.logprobs.detach().cpu())
        entropies.append(student.entropy.cpu())
    distributed.synchronize_replicated_gradients(model)
    return combine(metric_sets), torch.cat(logprobs), torch.cat(entropies)


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


def train_step(state: TrainState, batch: RolloutBatch, teacher: TeacherScores, objective: Objective,
               settings: StepSettings) -> dict[str, Metric]:
    """One optimizer step on a scored rollout batch."""
    metrics, logprobs, entropy = accumulate_gradients(state.student, batch, teacher, objective, settings)
    metrics.update(rollout_metrics(batch, teacher, logprobs, entropy))
    metrics = combine(distributed.gather_objects(metrics))  # every rank's rows
    metrics.update(apply_update(state, settings.max_grad_norm))
    return metrics


# --------------------------------------------------------------------------- the loop


def train(config: Config, *, resume: bool = False) -> Path:
    """Train the student; returns the folder of the final model (a save_pretrained folder)."""
    run_dir = Path(config.train.output_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None and not resume:
        raise FileExistsError(
            f"train.output_dir: '{run_dir}' already holds checkpoints; pass --resume to continue that run, "
            "or choose another output_dir (nothing was overwritten)"
        )
    if config.rollout.prompts_per_step % distributed.world_size():
        raise ValueError(f"rollout.prompts_per_step={config.rollout.prompts_per_step} must divide evenly over "
                         f"{distributed.world_size()} processes")
    seed_everything(config.train.seed + distributed.rank())
    if config.train.mixed_precision == "bf16" and not torch.cuda.is_available():
        raise ValueError("train.mixed_precision=bf16 autocasts on a GPU; on the CPU training stays float32 "
                         "(set train.mixed_precision=none)")
    if config.student.lora is not None and distributed.world_size() > 1:
        raise NotImplementedError("student.lora with more than one process is not supported yet (FSDP2 over "
                                  "peft adapters is untested); run LoRA on one process")
    uses_vllm = config.rollout.backend == "vllm" or any(t.backend == "vllm" for t in config.teachers)
    if uses_vllm and distributed.world_size() > 1:
        raise NotImplementedError("rollout.backend / teachers.*.backend: vllm runs one engine in one training "
                                  "process; with more than one process use backend hf")
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
    if run.student_engine is not None:
        run.student_engine.sync_weights(state.student)  # a resumed student, a LoRA student's merged weights
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    settings = StepSettings(
        aggregation=config.objective.aggregation, micro_batch_size=config.optim.micro_batch_size,
        temperature=config.rollout.temperature, chunk_size=config.train.logit_chunk,
        max_grad_norm=config.optim.max_grad_norm,
    )
    collect_settings = collect_settings_for(config, run.objective)
    # sft's teacher responses, generated once per prompt; checkpointed, so a resumed run reuses them.
    teacher_cache: dict = load_rank_state(checkpoint).get("teacher_responses", {}) if checkpoint else {}
    logger = None
    if distributed.is_main():
        logger = MetricsLogger(run_dir, total_steps=config.train.steps, start_step=state.step,
                               tensorboard=config.train.tensorboard, progress=config.train.progress)
    try:
        while state.step < config.train.steps:
            set_learning_rate(state.optimizer, config.optim, state.step, config.train.steps)
            with _autocast(config.train.mixed_precision):
                values = run_one_step(run, state, config, settings, collect_settings, teacher_cache)
            if config.eval.every and state.step % config.eval.every == 0:
                values.update(evaluate_during_training(state.student, run.tokenizer, config, run_dir))
            if logger is not None:
                logger.log(state.step, values)
            if _should_save(state.step, config):
                save_checkpoint(run_dir, state.student, run.tokenizer, state.optimizer,
                                CheckpointRecord(step=state.step, skipped_steps=state.skipped_steps,
                                                 data_position=state.step * config.rollout.prompts_per_step),
                                keep=config.train.keep_checkpoints, rank_state={"teacher_responses": teacher_cache})
    finally:
        if logger is not None:
            logger.close()
    final = run_dir / "final"
    save_model(state.student, run.tokenizer, final)
    return final


def run_one_step(run: Run, state: TrainState, config: Config, settings: StepSettings,
                 collect_settings: CollectSettings, teacher_cache: dict) -> dict[str, float]:
    started = time.perf_counter()
    indices = prompts_for_step(len(run.rows), state.step, config.rollout.prompts_per_step, config.train.seed,
                               config.data.shuffle)
    share = len(indices) // distributed.world_size()  # this rank's contiguous share of the step's prompts
    indices = indices[distributed.rank() * share : (distributed.rank() + 1) * share]
    batch = collect(run, state.step, indices, collect_settings, teacher_cache)
    if run.graders:
        batch = attach_rewards(batch, grade_batch(run, batch), run.sampling.samples_per_prompt)
    rolled = time.perf_counter()
    teacher = score_batch(batch, run.scorers, run.scoring)
    scored = time.perf_counter()
    metrics = train_step(state, batch, teacher, run.objective, settings)
    if run.student_engine is not None:
        run.student_engine.sync_weights(state.student)  # the next step samples from the updated policy
    finished = time.perf_counter()
    values = as_floats(metrics)
    if collect_settings.guidance:
        values["guidance/max_prefix_length"] = float(
            max_prefix_length(state.step - 1, config.train.steps, collect_settings.max_prefix_tokens))
    values.update({
        "perf/rollout_seconds": rolled - started,
        "perf/score_seconds": scored - rolled,
        "perf/train_seconds": finished - scored,  # with vLLM rollouts, the weight sync included
        "perf/tokens_per_second": distributed.all_reduce_sum(float(batch.response_mask.sum())) / (finished - started),
    })
    return values


def evaluate_during_training(student: nn.Module, tokenizer, config: Config, run_dir: Path) -> dict[str, float]:
    """Write the current student to run_dir/eval_model and run `opd eval`'s pipeline on it (rank 0)."""
    from opd.evaluate.run import EvalSettings, evaluate

    folder = run_dir / "eval_model"
    save_model(student, tokenizer, folder)  # every rank takes part in gathering a sharded student
    values: dict[str, float] = {}
    if distributed.is_main():
        settings = EvalSettings(samples=config.eval.samples, temperature=config.eval.temperature,
                                max_new_tokens=config.eval.max_new_tokens, limit=config.eval.limit)
        results = evaluate(list(config.eval.benchmarks), settings, str(run_dir / "eval"), model_dir=str(folder))
        for name, result in results["benchmarks"].items():
            values[f"eval/{name}/avg_at_k"] = result["avg_at_k"]
        for domain, value in results["domains"].items():
            values[f"eval/{domain}/average"] = value
    distributed.barrier()
    return values


def grade_batch(run: Run, batch: RolloutBatch) -> Tensor:  # [N] rewards in [0, 1]
    """Grade every response with its domain's grader; a domain without one is an error (grpo needs all)."""
    rewards = torch.zeros(batch.num_rows)
    for row in range(batch.num_rows):
        domain = batch.domain[row]
        if domain not in run.graders:
            raise ValueError(f"domain '{domain}' has no grader (teachers.*.grader), but others do: grade all or none")
        ids = batch.response_ids[row][batch.response_mask[row]]
        completion = run.tokenizer.decode(ids, skip_special_tokens=True)
        rewards[row] = run.graders[domain](run.rows[batch.prompt_index[row]], completion)
    return rewards


def collect_settings_for(config: Config, objective: Objective) -> CollectSettings:
    guidance = config.objective.guidance
    return CollectSettings(
        guidance=guidance.enabled, guidance_fraction=guidance.fraction,
        max_prefix_tokens=guidance.max_prefix_tokens or config.rollout.max_new_tokens,
        total_steps=config.train.steps, teacher_written=Signal.TEACHER_RESPONSES in objective.needs,
        onpolicy_fraction=config.objective.onpolicy_fraction, seed=config.train.seed,
    )


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


def to_device(data, device):
    """The same dataclass with every tensor field on `device` (a no-op on the CPU)."""
    values = {}
    for field in dataclasses.fields(data):
        value = getattr(data, field.name)
        values[field.name] = value.to(device) if isinstance(value, Tensor) else value
    return type(data)(**values)


def select_rows(data, rows: slice):
    """The same dataclass with every per-row field (tensors on dim 0, tuples) cut to `rows`."""
    values = {}
    for field in dataclasses.fields(data):
        value = getattr(data, field.name)
        values[field.name] = value[rows] if isinstance(value, (Tensor, tuple)) else value
    return type(data)(**values)


def _autocast(mode: str):
    import contextlib

    if mode == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _should_save(step: int, config: Config) -> bool:
    every = config.train.save_every
    return step == config.train.steps or (every > 0 and step % every == 0)
