"""Turn a validated Config into the objects a run needs, checking everything before any compute.

Order matters: the cheap checks (data rows, domains, tokenizers, chat templates) run before any weights
load, so a wrong config fails in seconds. Each model folder is loaded once, however many roles it plays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from opd.runtime import distributed
from opd.checks import (
    StartupError,
    check_domains,
    check_output_width,
    check_same_prompt_rendering,
    check_same_vocabulary,
)
from opd.config import STUDENT_INIT, Config
from opd.data import DataError, PromptRow, load_prompts
from opd.runtime.models import end_of_sequence_ids, load_model, load_tokenizer, output_width, render_prompt
from opd.grading.graders import Grader, build_grader
from opd.runtime.lora import AdaptersDisabled, attach_adapters, causal_lm, is_adapted
from opd.objectives import Objective, build_objective
from opd.rollout.batch import SamplingSettings
from opd.rollout.vllm import EngineSettings, VllmEngine
from opd.teachers import DomainScorer, ScoringSettings
from opd.types import Signal


@dataclass(frozen=True, kw_only=True, slots=True)
class Run:
    student: nn.Module
    tokenizer: object
    rows: list[PromptRow]
    prompt_ids: list[list[int]]  # student token ids of each dataset row's prompt
    scorers: dict[str, DomainScorer]  # by domain
    objective: Objective
    sampling: SamplingSettings
    scoring: ScoringSettings
    graders: dict[str, Grader]  # by domain; domains without a grader are absent
    dataset_responses: dict[int, list[int]] | None = None  # gkd's off-policy share: row -> response ids
    # rollout.backend vllm: the engine that samples for the student (weights synced after every step).
    student_engine: VllmEngine | None = None

    @property
    def rollout_policy(self):
        """What samples the student's responses: its vLLM engine, or the training model itself."""
        return self.student_engine if self.student_engine is not None else self.student

    def close(self) -> None:
        """Free the vLLM engines (the student's and the teachers') now."""
        engines = {id(e): e for e in [self.student_engine, *(s.teacher for s in self.scorers.values())]
                   if isinstance(e, VllmEngine)}
        for engine in engines.values():
            engine.close()


def assemble(config: Config, checkpoint: Path | None = None) -> Run:
    """Load and check everything; with `checkpoint`, the student's weights (or adapter) come from it."""
    objective = build_objective(config.objective, temperature=config.score_temperature,
                                lam_by_domain=config.lam_by_domain)
    rows = load_prompts(config.data.path, config.data.default_domain)
    check_domains(rows, [t.domain for t in config.teachers], config.data.path)

    tokenizer = load_tokenizer(config.student.path, key="student.path")
    prompt_ids = []
    for row in rows:
        ids = render_prompt(tokenizer, row.messages, config.data.prompt_format)
        if len(ids) > config.data.max_prompt_tokens:
            raise DataError(
                f"{config.data.path}: row {row.index + 1} has {len(ids)} prompt tokens, more than "
                f"data.max_prompt_tokens={config.data.max_prompt_tokens}"
            )
        prompt_ids.append(ids)
    teacher_prompts = _check_teacher_tokenizers(config, tokenizer, rows)
    dataset_responses = _dataset_responses(config, tokenizer, rows) if config.objective.onpolicy_fraction < 1 else None

    needs_topk = Signal.TEACHER_TOPK in objective.needs
    _check_vllm_teachers(config, objective)
    student = load_student(config, checkpoint)
    frozen = _FrozenModels(config, tokenizer, output_width(student), needs_topk)
    scorers = {}
    for index, teacher in enumerate(config.teachers):
        scorers[teacher.domain] = DomainScorer(
            domain=teacher.domain,
            teacher=frozen.get(teacher.path, teacher.dtype, f"teachers.{index}.path", teacher.shard,
                               teacher.backend)
            if teacher.path else None,
            # Without a teacher there is no reward lT - lR to anchor: no reference either.
            reference=frozen.reference(teacher.reference, teacher.dtype, f"teachers.{index}.reference", student,
                                       teacher.shard)
            if teacher.path else None,
            teacher_prompts=teacher_prompts.get(teacher.domain),
        )
    eos_ids = end_of_sequence_ids(student, tokenizer)
    sampling = SamplingSettings(
        samples_per_prompt=config.rollout.samples_per_prompt,
        temperature=config.rollout.temperature,
        top_p=config.rollout.top_p,
        max_new_tokens=config.rollout.max_new_tokens,
        batch_size=config.rollout.batch_size,
        end_of_sequence_ids=eos_ids,
        pad_id=tokenizer.pad_token_id,
        synced=distributed.world_size() > 1,
    )
    any_reference = any(s.reference is not None for s in scorers.values())
    scoring = ScoringSettings(
        temperature=config.score_temperature,
        topk=config.objective.topk if needs_topk else 0,
        chunk_size=config.train.logit_chunk,
        rows_per_forward=config.optim.micro_batch_size,
        logprob_floor=config.objective.logprob_floor,
        # References are scored whenever configured: the objective may use them and the implicit reward
        # lT - lR is always logged. Set reference: null (lam = 1 only) to skip that forward pass.
        need_reference=any_reference,
        need_entropy=Signal.TEACHER_ENTROPY in objective.needs,
        need_hidden=Signal.FULL_DISTRIBUTIONS in objective.needs,
    )
    graders = {t.domain: build_grader(t.grader) for t in config.teachers if t.grader != "none"}
    student_engine = None
    if config.rollout.backend == "vllm":
        # Built from the student's folder; train() syncs the training weights (a checkpoint's, LoRA's) in.
        student_engine = VllmEngine(engine_settings(config, config.student.path, config.student.dtype, 1))
    return Run(student=student, tokenizer=tokenizer, rows=rows, prompt_ids=prompt_ids, scorers=scorers,
               objective=objective, sampling=sampling, scoring=scoring, graders=graders,
               dataset_responses=dataset_responses, student_engine=student_engine)


def engine_settings(config: Config, path: str, dtype: str, max_logprobs: int) -> EngineSettings:
    vllm = config.rollout.vllm
    return EngineSettings(
        model_path=path, dtype=dtype, kv_cache_bytes=int(vllm.kv_cache_gib * 2**30),
        max_model_len=vllm.max_model_len or config.data.max_prompt_tokens + config.rollout.max_new_tokens,
        enforce_eager=vllm.enforce_eager, seed=config.train.seed, max_logprobs=max(max_logprobs, 1),
    )


def _check_vllm_teachers(config: Config, objective: Objective) -> None:
    """vLLM returns log-probs and top-k only: objectives needing more are refused before any loading."""
    unavailable = {Signal.TEACHER_ENTROPY: "the teacher's entropy", Signal.FULL_DISTRIBUTIONS: "full distributions"}
    missing = [unavailable[signal] for signal in objective.needs if signal in unavailable]
    for index, teacher in enumerate(config.teachers):
        if teacher.backend == "vllm" and missing:
            raise StartupError(f"teachers.{index}.backend: objective {list(config.objective.names)} needs "
                               f"{' and '.join(missing)}, which vLLM scoring does not return; use backend hf")


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
    if settings.gradient_checkpointing:
        causal_lm(student).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return student


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
        teacher_tokenizer = load_tokenizer(teacher.path, key=f"{key}.path", chat_template=teacher.chat_template)
        check_same_vocabulary(student_tokenizer, teacher_tokenizer, key)
        if teacher.chat_template is None:
            check_same_prompt_rendering(student_tokenizer, teacher_tokenizer, rows, config.data.prompt_format, key,
                                        config.data.path)
        else:
            own_prompts[teacher.domain] = {
                row.index: render_prompt(teacher_tokenizer, row.messages, config.data.prompt_format)
                for row in rows
                if row.domain == teacher.domain
            }
        if teacher.reference not in (None, STUDENT_INIT):
            reference_tokenizer = load_tokenizer(teacher.reference, key=f"{key}.reference")
            check_same_vocabulary(student_tokenizer, reference_tokenizer, f"{key}.reference")
    return own_prompts


class _FrozenModels:
    """Loads each frozen model folder once and checks its output head against the student's."""

    def __init__(self, config: Config, tokenizer, student_width: int, needs_topk: bool):
        self._config, self._tokenizer = config, tokenizer
        self._student_width, self._needs_topk = student_width, needs_topk
        self._loaded: dict[tuple, nn.Module | VllmEngine] = {}

    def get(self, path: str, dtype: str, key: str, shard: bool = False, backend: str = "hf"):
        identity = (str(Path(path).resolve()), dtype, shard, backend)
        if identity not in self._loaded and backend == "vllm":
            check_output_width(self._student_width, _configured_width(path), len(self._tokenizer), key,
                               self._needs_topk)
            topk = self._config.objective.topk if self._needs_topk else 1
            self._loaded[identity] = VllmEngine(engine_settings(self._config, path, dtype, topk))
        if identity not in self._loaded:
            model = load_model(path, dtype, key=key)
            check_output_width(self._student_width, output_width(model), len(self._tokenizer), key, self._needs_topk)
            self._loaded[identity] = distributed.shard_frozen(model) if shard else model
        return self._loaded[identity]

    def reference(self, reference: str | None, dtype: str, key: str, student=None, shard: bool = False):
        if reference is None:
            return None
        if reference == STUDENT_INIT and student is not None and is_adapted(student):
            return AdaptersDisabled(student)  # LoRA's initial student is the model without its adapters
        if reference == STUDENT_INIT:
            # Always the initial weights, also when resuming: the reference must not move with the student.
            return self.get(self._config.student.path, self._config.student.dtype, key, shard)
        return self.get(reference, dtype, key, shard)  # a teacher-side base: the teacher's dtype


def _configured_width(path: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True).vocab_size


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


__all__ = ["Run", "assemble", "seed_everything", "StartupError"]
