"""The cross-key rules of a run configuration (config.py's tree): checked whenever a tree is built.

Each message names the dotted key; the loader already checked types and refused non-finite numbers. The
rules ask the objectives what they need (signals, λ readers) rather than keeping a second list here.
"""

from __future__ import annotations

import math

from opd.config import SEED_LIMIT, Config, ServerConfig, is_server_url
from opd.config_tree import ConfigError, nonfinite_floats
from opd.evaluate.benchmarks import BENCHMARKS
from opd.grading.custom import grader_problem
from opd.objectives import LAM_READERS, TEACHER_SIGNALS, BuildContext, build_single, registered_names
from opd.types import Signal


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

    _validate_teachers(config, require, problems)
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


def _validate_teachers(config: Config, require, problems: list[str]) -> None:
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
        if teacher.reference is None and lam != 1.0:
            problems.append(
                f"{where}.reference: lam = {lam} for domain '{teacher.domain}' needs a reference model "
                "(G-OPD reward lam*(log pi_T - log pi_ref)); set reference to 'student_init' or a model "
                "folder. opd never falls back to plain OPD silently."
            )


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
