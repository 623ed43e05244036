"""Turn a validated Config into the objects a run needs, after every start-up check (checks.py).

Order matters: the cheap checks (data rows, domains, the fields graders read, tokenizers, top-k, chat
templates) run before any weights load, so a wrong config fails in seconds; each model's weights are checked
finite as it loads. Each model folder is loaded once, however many roles it plays.
Backends are chosen here and nowhere else: the student's `Sampler` (rollout.backend) and each frozen
model's `Scorer` and `Sampler` (teachers.N.backend) come from the factories below, so adding a backend is a
class and a line in a factory.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig

from opd.checks import (
    StartupError,
    check_domains,
    check_grader_fields,
    check_output_width,
    check_prompt_lengths,
    check_same_end_of_sequence,
    check_same_prompt_rendering,
    check_same_vocabulary,
    check_topk,
    check_vllm_teachers,
)
from opd.collect import CollectSettings
from opd.config import STUDENT_INIT, Config, ServerConfig, is_server_url
from opd.data import DataError, PromptRow, keep_rows, load_prompts
from opd.grading.custom import make_grader
from opd.grading.graders import Grader
from opd.objectives import Objective, build_objective
from opd.rollout.batch import Sampler, SamplingSettings
from opd.rollout.hf import HfSampler
from opd.rollout.vllm import EngineSettings, VllmEngine
from opd.runtime import distributed
from opd.runtime.hub import local_model_folder
from opd.served.checks import PROBE_TEXT, ServedExpectation, check_served_model
from opd.served.client import RetrySettings, ServerClient
from opd.served.engine import ServedModel, ServedSettings
from opd.runtime.lora import AdaptersDisabled, attach_adapters, causal_lm, is_adapted
from opd.runtime.models import (
    check_finite_weight_files,
    check_finite_weights,
    end_of_sequence_ids,
    folder_end_of_sequence_ids,
    load_model,
    load_tokenizer,
    output_width,
    read_chat_template,
    render_prompt,
)
from opd.teachers import DomainScorer, HfScorer, Scorer, ScoringSettings
from opd.types import Signal


@dataclass(frozen=True, kw_only=True, slots=True)
class StepSettings:
    """What train_step needs besides the batch (train.py)."""

    aggregation: str
    micro_batch_size: int
    temperature: float  # the student's log-probs are taken at its sampling temperature
    chunk_size: int
    max_grad_norm: float | None
    micro_batch_tokens: int | None = None  # None: micro_batch_size rows per micro-batch
    packed: bool = False  # the student's forward on packed rows (packing.py)
    group_by_length: bool = False  # micro-batches of rows of similar length (optim.group_by_length)


@dataclass(frozen=True, kw_only=True, slots=True)
class Run:
    """Everything a run's steps use, built once: a step reads these and its TrainState, never the config."""

    student: nn.Module
    tokenizer: object
    rows: list[PromptRow]
    prompt_ids: list[list[int]]  # student token ids of each dataset row's prompt
    sampler: Sampler  # samples the student's responses (rollout.backend)
    scorers: dict[str, DomainScorer]  # by domain
    objective: Objective
    graders: dict[str, Grader]  # by domain; domains without a grader are absent
    sampling: SamplingSettings
    scoring: ScoringSettings
    collect: CollectSettings
    step: StepSettings
    dataset_responses: dict[int, list[int]] | None = None  # gkd's off-policy share: row -> response ids

    def close(self) -> None:
        """Free every sampler's and scorer's resources (vLLM engines) now, each shared one once."""
        parts = [self.sampler]
        for scorer in self.scorers.values():
            parts.extend(p for p in (scorer.teacher, scorer.reference, scorer.writer) if p is not None)
        for part in {id(p): p for p in parts}.values():
            part.close()


def assemble(config: Config, checkpoint: Path | None = None) -> Run:
    """Check and load everything; with `checkpoint`, the student's weights (or adapter) come from it."""
    config = with_local_model_folders(config)
    objective = build_objective(config.objective, temperature=config.score_temperature,
                                lam_by_domain=config.lam_by_domain)
    check_vllm_teachers(config, objective.needs)
    rows = load_prompts(config.data.path, config.data.default_domain)
    check_domains(rows, [t.domain for t in config.teachers], config.data.path)
    check_grader_fields(rows, {t.domain: (f"teachers.{i}.grader", t.grader) for i, t in enumerate(config.teachers)
                               if t.grader != "none"}, config.data.path)
    tokenizer = load_tokenizer(config.student.path, key="student.path")
    needs_topk = Signal.TEACHER_TOPK in objective.needs
    check_topk(config.objective.topk, len(tokenizer), needs_topk)
    prompt_ids = [render_prompt(tokenizer, row.messages, config.data.prompt_format, config.student.chat_template_kwargs)
                  for row in rows]
    if config.data.drop_long_prompts:
        rows, prompt_ids = _drop_long_prompts(rows, prompt_ids, config)
    check_prompt_lengths(prompt_ids, rows, config.data.max_prompt_tokens, config.data.path)
    teacher_prompts = _check_teacher_tokenizers(config, tokenizer, rows)
    _check_servers(config, tokenizer, rows, prompt_ids, teacher_prompts, config.objective.topk if needs_topk else 0)
    dataset_responses = _dataset_responses(config, tokenizer, rows) if config.objective.onpolicy_fraction < 1 else None

    student = load_student(config, checkpoint)
    frozen = _FrozenModels(config, len(tokenizer), output_width(student), needs_topk)
    scorers = {teacher.domain: _domain_scorer(config, index, frozen, student, teacher_prompts)
               for index, teacher in enumerate(config.teachers)}
    return Run(
        student=student, tokenizer=tokenizer, rows=rows, prompt_ids=prompt_ids,
        sampler=SAMPLERS[config.rollout.backend](config, student, tokenizer), scorers=scorers, objective=objective,
        graders={t.domain: make_grader(t.grader) for t in config.teachers if t.grader != "none"},
        sampling=sampling_settings(config, end_of_sequence_ids(student, tokenizer), tokenizer.pad_token_id),
        scoring=scoring_settings(config, objective, any(s.reference is not None for s in scorers.values())),
        collect=collect_settings(config, objective), step=step_settings(config), dataset_responses=dataset_responses,
    )


def with_local_model_folders(config: Config) -> Config:
    """The config with every model path (student, teachers, references) a local folder: hub ids resolved
    from the local Hugging Face cache once, here, so that every reader (tokenizers, weights, vLLM engines,
    generation configs) sees the same folder. The run folder records the paths as the user wrote them."""
    teachers = tuple(dataclasses.replace(
        teacher,
        path=None if teacher.path is None else local_model_folder(teacher.path, f"teachers.{index}.path"),
        reference=(teacher.reference if teacher.reference in (None, STUDENT_INIT) or is_server_url(teacher.reference)
                   else local_model_folder(teacher.reference, f"teachers.{index}.reference")),
    ) for index, teacher in enumerate(config.teachers))
    student = dataclasses.replace(config.student, path=local_model_folder(config.student.path, "student.path"))
    return dataclasses.replace(config, student=student, teachers=teachers)


def _domain_scorer(config: Config, index: int, frozen: "_FrozenModels", student: nn.Module,
                   teacher_prompts: dict[str, dict[int, list[int]]]) -> DomainScorer:
    teacher = config.teachers[index]
    key = f"teachers.{index}"
    if teacher.path is None:  # no teacher (grpo alone): no reward lT - lR to anchor, so no reference either
        return DomainScorer(domain=teacher.domain, teacher=None, reference=None)
    scorer, writer = frozen.get(teacher.path, teacher.dtype, f"{key}.path", teacher.shard, teacher.backend,
                                server=teacher.server, drop_padded=teacher.drop_padded_logits)
    if is_server_url(teacher.reference):
        reference = ServedModel(served_settings(dataclasses.replace(teacher.server, urls=(teacher.reference,)),
                                                f"{key}.reference"))
    else:
        reference = frozen.reference(teacher.reference, teacher.dtype, f"{key}.reference", student, teacher.shard)
    return DomainScorer(
        domain=teacher.domain, teacher=scorer, writer=writer, reference=reference,
        teacher_prompts=teacher_prompts.get(teacher.domain),
    )


def sampling_settings(config: Config, end_ids: tuple[int, ...], pad_id: int) -> SamplingSettings:
    rollout = config.rollout
    return SamplingSettings(
        samples_per_prompt=rollout.samples_per_prompt, temperature=rollout.temperature, top_p=rollout.top_p,
        max_new_tokens=rollout.max_new_tokens, batch_size=rollout.batch_size, end_of_sequence_ids=end_ids,
        pad_id=pad_id, synced=distributed.world_size() > 1,
    )


def scoring_settings(config: Config, objective: Objective, any_reference: bool) -> ScoringSettings:
    needs_topk = Signal.TEACHER_TOPK in objective.needs
    return ScoringSettings(
        topk=config.objective.topk if needs_topk else 0,
        rows_per_forward=config.optim.micro_batch_size,
        group_by_length=config.optim.group_by_length,
        logprob_floor=config.objective.logprob_floor,
        # References are scored whenever configured: the objective may use them and the implicit reward
        # lT - lR is always logged. Set reference: null (lam = 1 only) to skip that forward pass.
        need_reference=any_reference,
        need_entropy=Signal.TEACHER_ENTROPY in objective.needs,
        need_hidden=Signal.FULL_DISTRIBUTIONS in objective.needs,
    )


def collect_settings(config: Config, objective: Objective) -> CollectSettings:
    guidance = config.objective.guidance
    return CollectSettings(
        prompts_per_step=config.rollout.prompts_per_step, shuffle=config.data.shuffle,
        guidance=guidance.enabled, guidance_fraction=guidance.fraction,
        max_prefix_tokens=guidance.max_prefix_tokens or config.rollout.max_new_tokens,
        total_steps=config.train.steps, teacher_written=Signal.TEACHER_RESPONSES in objective.needs,
        onpolicy_fraction=config.objective.onpolicy_fraction, seed=config.train.seed,
    )


def step_settings(config: Config) -> StepSettings:
    return StepSettings(
        aggregation=config.objective.aggregation, micro_batch_size=config.optim.micro_batch_size,
        temperature=config.rollout.temperature, chunk_size=config.train.logit_chunk,
        max_grad_norm=config.optim.max_grad_norm, micro_batch_tokens=config.optim.micro_batch_tokens,
        packed=config.optim.pack_sequences, group_by_length=config.optim.group_by_length,
    )


def engine_settings(config: Config, path: str, dtype: str, max_logprobs: int) -> EngineSettings:
    vllm = config.rollout.vllm
    return EngineSettings(
        model_path=path, dtype=dtype, kv_cache_bytes=int(vllm.kv_cache_gib * 2**30),
        max_model_len=vllm.max_model_len or config.data.max_prompt_tokens + config.rollout.max_new_tokens,
        enforce_eager=vllm.enforce_eager, seed=config.train.seed, max_logprobs=max(max_logprobs, 1),
    )


def served_settings(server: ServerConfig, key: str, *, sync_folder: str | None = None,
                    probe: tuple[int, ...] = (), temperature: float = 1.0) -> ServedSettings:
    return ServedSettings(
        urls=server.urls, max_concurrency=server.max_concurrency, key=key, sync_folder=sync_folder,
        sync=server.sync, nccl_address=server.nccl_address,
        retry=RetrySettings(timeout_seconds=server.timeout_seconds, attempts=server.attempts,
                            backoff_seconds=server.backoff_seconds),
        probe_prompt=probe, probe_temperature=temperature, probe_tolerance=server.probe_tolerance,
    )


def _served_student(config: Config, tokenizer) -> ServedModel:
    server = config.rollout.server
    folder = (server.sync_folder or str(Path(config.train.output_dir) / "served_weights")) if server.sync == "folder" else None
    probe = tuple(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    return ServedModel(served_settings(server, "rollout.server", sync_folder=folder, probe=probe,
                                       temperature=config.rollout.temperature))


# The student's sampler, by rollout.backend. A vLLM engine or server starts from the student's folder; the
# loop syncs the training weights (a checkpoint's, LoRA's merged) into it before the first step.
SAMPLERS: dict[str, Callable[[Config, nn.Module, object], Sampler]] = {
    "hf": lambda config, student, tokenizer: HfSampler(student, shared_noise=config.rollout.shared_noise),
    "vllm": lambda config, student, tokenizer: VllmEngine(
        engine_settings(config, config.student.path, config.student.dtype, 1)),
    "vllm-server": lambda config, student, tokenizer: _served_student(config, tokenizer),
}


def load_student(config: Config, checkpoint: Path | None) -> nn.Module:
    """The trainable student: full weights, or the base with LoRA adapters (new, or the checkpoint's)."""
    settings = config.student
    if settings.lora is None:
        path = str(checkpoint / "model") if checkpoint is not None else settings.path
        student = load_model(path, settings.dtype, key="student.path", trainable=True)
    else:
        base = load_model(settings.path, settings.dtype, key="student.path", trainable=False)
        adapter = str(checkpoint / "adapter") if checkpoint is not None else None
        student = attach_adapters(base, settings.lora, adapter)
        if adapter is not None:
            check_finite_weights(student, "student.path", adapter)  # the base was checked by load_model
    if settings.gradient_checkpointing:
        causal_lm(student).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return student


def _drop_long_prompts(rows: list[PromptRow], prompt_ids: list[list[int]],
                       config: Config) -> tuple[list[PromptRow], list[list[int]]]:
    """data.drop_long_prompts: rows whose prompt exceeds data.max_prompt_tokens leave the run, counted."""
    keep = [len(ids) <= config.data.max_prompt_tokens for ids in prompt_ids]
    dropped = keep.count(False)
    if dropped == len(rows):
        raise DataError(f"{config.data.path}: every one of the {len(rows)} rows has more than "
                        f"data.max_prompt_tokens={config.data.max_prompt_tokens} prompt tokens")
    if dropped and distributed.is_main():
        print(f"opd: data.drop_long_prompts: dropped {dropped} of {len(rows)} rows of {config.data.path} with more "
              f"than data.max_prompt_tokens={config.data.max_prompt_tokens} prompt tokens", file=sys.stderr)
    return keep_rows(rows, keep), [ids for ids, wanted in zip(prompt_ids, keep) if wanted]


def _dataset_responses(config: Config, tokenizer, rows: list[PromptRow]) -> dict[int, list[int]]:
    """gkd with onpolicy_fraction < 1 answers some prompts with the row's `response` (plus end of sequence)."""
    responses = {}
    for row in rows:
        text = row.extra.get("response")
        if not isinstance(text, str) or not text:
            raise DataError(f"{config.data.path}: row {row.index + 1} has no 'response' text, which "
                            f"objective.onpolicy_fraction={config.objective.onpolicy_fraction} needs")
        responses[row.index] = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return responses


def _check_teacher_tokenizers(config: Config, student_tokenizer, rows) -> dict[str, dict[int, list[int]]]:
    """Vocabulary and template checks; returns the teacher-rendered prompts of teachers with own templates."""
    own_prompts: dict[str, dict[int, list[int]]] = {}
    for index, teacher in enumerate(config.teachers):
        key = f"teachers.{index}"
        if teacher.path is None:
            continue
        template = (read_chat_template(teacher.chat_template, f"{key}.chat_template")
                    if teacher.chat_template is not None else None)
        teacher_tokenizer = load_tokenizer(teacher.path, key=f"{key}.path", chat_template=template)
        check_same_vocabulary(student_tokenizer, teacher_tokenizer, key)
        check_same_end_of_sequence(folder_end_of_sequence_ids(config.student.path, student_tokenizer),
                                   folder_end_of_sequence_ids(teacher.path, teacher_tokenizer), key, teacher.path)
        if teacher.chat_template is None:
            check_same_prompt_rendering((student_tokenizer, config.student.chat_template_kwargs),
                                        (teacher_tokenizer, config.template_kwargs_for(teacher)), rows,
                                        config.data.prompt_format, key, config.data.path)
        else:
            own_prompts[teacher.domain] = {
                row.index: render_prompt(teacher_tokenizer, row.messages, config.data.prompt_format,
                                         config.template_kwargs_for(teacher))
                for row in rows
                if row.domain == teacher.domain
            }
        if teacher.reference not in (None, STUDENT_INIT) and not is_server_url(teacher.reference):  # a server: _check_servers
            reference_tokenizer = load_tokenizer(teacher.reference, key=f"{key}.reference")
            check_same_vocabulary(student_tokenizer, reference_tokenizer, f"{key}.reference")
    return own_prompts


class _FrozenModels:
    """Loads each frozen model folder once (per dtype, sharding and backend) and checks its output head
    against the student's; hands out its `Scorer` and its `Sampler` (which writes teacher responses)."""

    def __init__(self, config: Config, vocabulary_size: int, student_width: int, needs_topk: bool):
        self._vocabulary_size, self._student_width, self._needs_topk = vocabulary_size, student_width, needs_topk
        self._student_path, self._student_dtype = config.student.path, config.student.dtype
        self._temperature, self._chunk_size = config.score_temperature, config.train.logit_chunk
        self._packed = config.optim.pack_sequences
        topk = config.objective.topk if needs_topk else 1
        self._engine_settings = lambda path, dtype: engine_settings(config, path, dtype, topk)
        self._loaded: dict[tuple, tuple[Scorer, Sampler]] = {}

    def get(self, path: str, dtype: str, key: str, shard: bool = False, backend: str = "hf",
            server: ServerConfig | None = None, drop_padded: bool = False) -> tuple[Scorer, Sampler]:
        identity = (str(Path(path).resolve()), dtype, shard, backend, server.urls if server else (), drop_padded)
        if identity not in self._loaded:
            self._loaded[identity] = FROZEN_BACKENDS[backend](self, path, dtype, key, shard, server, drop_padded)
        return self._loaded[identity]

    def reference(self, reference: str | None, dtype: str, key: str, student: nn.Module, shard: bool) -> Scorer | None:
        if reference is None:
            return None
        if reference == STUDENT_INIT and is_adapted(student):
            # LoRA's initial student is the model without its adapters: no second copy in memory.
            return HfScorer(AdaptersDisabled(student), temperature=self._temperature, chunk_size=self._chunk_size,
                            packed=self._packed)
        if reference == STUDENT_INIT:
            # Always the initial weights, also when resuming: the reference must not move with the student.
            return self.get(self._student_path, self._student_dtype, key, shard)[0]
        return self.get(reference, dtype, key, shard)[0]  # a teacher-side base: the teacher's dtype

    def load_hf(self, path: str, dtype: str, key: str, shard: bool, server=None,
                drop_padded: bool = False) -> tuple[Scorer, Sampler]:
        model = load_model(path, dtype, key=key)
        check_output_width(self._student_width, output_width(model), self._vocabulary_size, key, self._needs_topk,
                           drop_padded)
        model = distributed.shard_frozen(model) if shard else model
        kept_width = self._student_width if drop_padded else None  # the ids the student can score
        scorer = HfScorer(model, temperature=self._temperature, chunk_size=self._chunk_size, packed=self._packed,
                          kept_width=kept_width)
        return scorer, HfSampler(model, kept_width)

    def load_vllm(self, path: str, dtype: str, key: str, shard: bool, server=None,
                  drop_padded: bool = False) -> tuple[Scorer, Sampler]:
        check_finite_weight_files(path, key)  # the engine loads the weights itself
        check_output_width(self._student_width, _configured_width(path), self._vocabulary_size, key, self._needs_topk,
                           drop_padded)  # drop_padded with vllm: refused by config.py
        engine = VllmEngine(self._engine_settings(path, dtype))
        return engine, engine

    def load_served(self, path: str, dtype: str, key: str, shard: bool, server: ServerConfig,
                    drop_padded: bool = False) -> tuple[Scorer, Sampler]:
        """Servers checked at start-up (_check_servers); the folder's configured width checked here."""
        check_output_width(self._student_width, _configured_width(path), self._vocabulary_size, key, self._needs_topk,
                           drop_padded)  # drop_padded with a server: refused by config.py
        model = ServedModel(served_settings(server, key.removesuffix(".path") + ".server"))
        return model, model


# A frozen model (teacher or reference) by teachers.N.backend: its scorer and the sampler that writes its
# responses (guidance prefixes, sft).
FROZEN_BACKENDS: dict[str, Callable[..., tuple[Scorer, Sampler]]] = {
    "hf": _FrozenModels.load_hf,
    "vllm": _FrozenModels.load_vllm,
    "vllm-server": _FrozenModels.load_served,
}


def _check_servers(config: Config, tokenizer, rows, prompt_ids: list[list[int]],
                   teacher_prompts: dict[str, dict[int, list[int]]], topk: int) -> None:
    """Each served model agrees with the model it stands for (served/checks.py), before any weights load."""
    required = config.data.max_prompt_tokens + config.rollout.max_new_tokens + 1
    format_ = config.data.prompt_format

    def expectation(key, model_tokenizer, width, domain, ids_of, depth, reloads, kwargs=None):
        chosen = [row for row in rows if domain is None or row.domain == domain][:3]
        renderings = tuple((row.messages, tuple(ids_of(row))) for row in chosen)
        return ServedExpectation(key=key, tokenizer=model_tokenizer, width=width, renderings=renderings,
                                 prompt_format=format_, required_length=required, topk=depth, reloads=reloads,
                                 weight_transfer=reloads and config.rollout.server.sync == "nccl",
                                 chat_template_kwargs=dict(config.student.chat_template_kwargs if kwargs is None else kwargs))

    student_ids = {row.index: ids for row, ids in zip(rows, prompt_ids, strict=True)}
    student_width = _configured_width(config.student.path)
    checks: list[tuple[tuple[str, ...], ServedExpectation]] = []
    if config.rollout.backend == "vllm-server":
        checks.append((config.rollout.server.urls, expectation(
            "rollout.server", tokenizer, student_width, None, lambda row: student_ids[row.index], 0, True)))
    for index, teacher in enumerate(config.teachers):
        key = f"teachers.{index}"
        if teacher.backend == "vllm-server":
            own = teacher_prompts.get(teacher.domain)
            teacher_tokenizer = load_tokenizer(teacher.path, key=f"{key}.path", chat_template=(
                read_chat_template(teacher.chat_template, f"{key}.chat_template") if teacher.chat_template else None))
            checks.append((teacher.server.urls, expectation(
                f"{key}.server", teacher_tokenizer, _configured_width(teacher.path), teacher.domain,
                lambda row, own=own: (own or student_ids)[row.index], topk, False, config.template_kwargs_for(teacher))))
        if is_server_url(teacher.reference):
            checks.append(((teacher.reference,), expectation(
                f"{key}.reference", tokenizer, student_width, teacher.domain,
                lambda row: student_ids[row.index], 0, False)))
    for urls, expected in checks:
        retry = RetrySettings(timeout_seconds=60.0, attempts=2, backoff_seconds=1.0)
        for url in urls:
            try:
                check_served_model(ServerClient(url, retry), expected)
            except ValueError as error:
                raise StartupError(str(error)) from None


def _configured_width(path: str) -> int:
    return AutoConfig.from_pretrained(path, local_files_only=True).vocab_size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


__all__ = ["Run", "StepSettings", "assemble", "seed_everything", "StartupError"]
