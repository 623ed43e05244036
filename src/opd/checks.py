"""Start-up refusals: everything a run is refused for once its config is valid, before any model loads.

`check_launch` takes what depends on where the run starts (processes, a GPU, the run folder); the rest
needs the data or the tokenizers. Each failure names what is wrong and where (config key, file row, token
position). Many are the silent misalignment bugs peers shipped (a teacher reading different token ids than
the student: tinker #796, ms-swift #9429 / #9671), turned into errors.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

from opd.config import SEED_LIMIT, Config, is_server_url, load_config, to_dict
from opd.data import DataError, PromptRow
from opd.runtime.checkpoint import checkpoint_step
from opd.runtime.models import render_prompt
from opd.runtime.run_folder import check_output_folder, segment_configs
from opd.types import Signal

# Config keys (and key prefixes, ending in '.') that change how a run is carried out but not what it trains:
# a resume may change them without --allow-config-change. Everything else (objective, lam, lr, data,
# models, seeds, sampling...) shaped the steps already taken.
RESUMABLE_KEYS = (
    "train.steps", "train.output_dir", "train.save_every", "train.keep_checkpoints", "train.tensorboard", "train.progress",
    "train.log_every", "train.log_samples_every", "train.log_samples_per_domain", "train.logit_chunk",
    "optim.micro_batch_size", "rollout.batch_size", "rollout.vllm.", "eval.",
)

# How many dataset prompts are rendered by both tokenizers to compare chat templates.
TEMPLATE_PROBE_ROWS = 32


class StartupError(ValueError):
    pass


def check_launch(config: Config, *, world_size: int, cuda: bool, resume: bool, checkpoint: Path | None,
                 allow_config_change: bool = False) -> list[str]:
    """What the config cannot do where it is started: the process count, the device, the run folder.
    Returns the keys a resume changes that alter what is trained (allowed by `allow_config_change`)."""
    check_output_folder(Path(config.train.output_dir))  # files opd did not write are never written over
    if checkpoint is not None and not resume:
        raise FileExistsError(
            f"train.output_dir: '{config.train.output_dir}' already holds checkpoints; pass --resume to continue "
            "that run, or choose another output_dir (nothing was overwritten)"
        )
    changed = check_resume(config, checkpoint, allow_config_change) if checkpoint is not None else []
    check_process_count(config, world_size)
    if config.train.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise StartupError("train.wandb is set but the wandb package is not installed: pip install 'opd[wandb]' "
                           "(or remove the train.wandb block)")
    if config.train.mixed_precision == "bf16" and not cuda:
        raise StartupError("train.mixed_precision=bf16 autocasts on a GPU; on the CPU training stays float32 "
                           "(set train.mixed_precision=none)")
    if config.rollout.backend == "vllm-server" and config.rollout.server.sync == "nccl":
        check_nccl_sync(cuda)
    return changed


def check_nccl_sync(cuda: bool) -> None:
    """rollout.server.sync: nccl sends from GPU memory and drives vLLM's weight-transfer engine from here."""
    if not cuda:
        raise StartupError("rollout.server.sync: nccl sends weights from GPU memory over NCCL, and this training "
                           "process has no CUDA device (torch.cuda.is_available() is False); use sync: folder")
    try:
        import vllm.distributed.weight_transfer.nccl_engine  # noqa: F401
    except ImportError as error:
        raise StartupError(f"rollout.server.sync: nccl drives vLLM's weight-transfer engine from the training "
                           f"process, which cannot import it ({error}); install vllm here too, or use sync: "
                           "folder") from None


def check_resume(config: Config, checkpoint: Path, allow_config_change: bool) -> list[str]:
    """A resume continues the recorded run: no fewer steps than the checkpoint holds, and the same config
    except for RESUMABLE_KEYS, unless `allow_config_change` (the changed keys are returned, to be recorded)."""
    done = checkpoint_step(checkpoint)
    if config.train.steps < done:
        raise StartupError(f"train.steps={config.train.steps} is below the {done} steps the checkpoint "
                           f"{checkpoint} already holds; resume with train.steps >= {done}")
    recorded = segment_configs(Path(config.train.output_dir))
    if not recorded:
        return []
    changed = [key for key in _differing_keys(to_dict(load_config(recorded[-1])), to_dict(config))
               if not any(key == allowed or (allowed.endswith(".") and key.startswith(allowed))
                          for allowed in RESUMABLE_KEYS)]
    if changed and not allow_config_change:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise StartupError(
            f"--resume: {shown} differ from {recorded[-1]}, which the steps so far ran with; resume with that "
            "config, or pass --allow-config-change to continue with the new values (recorded in the run folder "
            "as this segment's config)")
    return changed


def _differing_keys(before, after, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two to_dict trees (list items by index)."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = list(before) + [k for k in after if k not in before]
        return [d for k in keys for d in _differing_keys(before.get(k), after.get(k), f"{prefix}{k}.")]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [d for i, (b, a) in enumerate(zip(before, after)) for d in _differing_keys(b, a, f"{prefix}{i}.")]
    return [] if before == after else [prefix.rstrip(".")]


def _in_process_models(config: Config) -> list[str]:
    """The teachers and references that run in the training process, as 'key is value' phrases."""
    found = []
    for index, teacher in enumerate(config.teachers):
        if teacher.path is not None and teacher.backend != "vllm-server":
            found.append(f"teachers.{index}.backend is {teacher.backend}")
        if teacher.path is not None and teacher.reference is not None and not is_server_url(teacher.reference):
            found.append(f"teachers.{index}.reference is {teacher.reference}")
    return found


def check_process_count(config: Config, world_size: int) -> None:
    """What the config cannot do on `world_size` processes; needs nothing but the config, so `opd train
    --nproc N` asks it before launching torchrun (one `opd:` line, not a traceback per process)."""
    if config.rollout.prompts_per_step % world_size:
        raise StartupError(f"rollout.prompts_per_step={config.rollout.prompts_per_step} must divide evenly over "
                           f"{world_size} processes")
    if config.train.seed + world_size > SEED_LIMIT:
        raise StartupError(f"train.seed={config.train.seed}: process r seeds with train.seed + r, and "
                           f"{config.train.seed + world_size - 1} is past numpy's largest seed 2**32 - 1")
    if config.student.lora is not None and world_size > 1:
        raise StartupError("student.lora with more than one process is not supported yet (FSDP2 over peft "
                           "adapters is untested); run LoRA on one process")
    in_process = _in_process_models(config)
    if config.rollout.async_ and world_size > 1 and in_process:
        # The rollout thread scores with the teachers and references and writes teacher responses. Served
        # ones are HTTP requests only; an in-process model may issue collectives there (a sharded one's
        # domain gathers and paired idle forwards, the HF sampler's synced lockstep) that would race the training
        # thread's on the same process group. The rollouts themselves are served (config.py).
        raise StartupError(f"rollout.async with more than one process needs every teacher and reference served: "
                           f"{in_process[0]} runs in the training process, where its collectives would race the "
                           "trainer's; serve it (backend: vllm-server; a reference as a server URL, or null when "
                           "lam = 1) or run async on one process")
    in_process_teachers = [i for i, t in enumerate(config.teachers) if t.backend == "vllm"]
    if in_process_teachers and world_size > 1:
        # Shutting a colocated engine down tears down the default process group (vLLM's cleanup), which a
        # second engine per process would still need: untested, so refused rather than risked mid-run.
        raise StartupError(f"teachers.{in_process_teachers[0]}.backend: vllm runs in one training process only; "
                           "with more processes serve the teacher (backend: vllm-server, `opd serve`) or use hf")


def check_vllm_teachers(config: Config, needs: frozenset[Signal]) -> None:
    """vLLM returns log-probs and top-k only: objectives needing more are refused before any loading."""
    unavailable = {Signal.TEACHER_ENTROPY: "the teacher's entropy", Signal.FULL_DISTRIBUTIONS: "full distributions"}
    missing = [unavailable[signal] for signal in needs if signal in unavailable]
    for index, teacher in enumerate(config.teachers):
        if teacher.backend != "hf" and missing:
            raise StartupError(f"teachers.{index}.backend: objective {list(config.objective.names)} needs "
                               f"{' and '.join(missing)}, which vLLM scoring ({teacher.backend}) does not return; "
                               "use backend hf")


def check_prompt_lengths(prompt_ids: list[list[int]], rows: list[PromptRow], max_tokens: int, data_path: str) -> None:
    for row, ids in zip(rows, prompt_ids, strict=True):
        if len(ids) > max_tokens:
            raise DataError(f"{data_path}: row {row.index + 1} has {len(ids)} prompt tokens, more than "
                            f"data.max_prompt_tokens={max_tokens} (raise it, or set data.drop_long_prompts: true to leave such rows out)")


def check_domains(rows: list[PromptRow], teacher_domains: list[str], data_path: str) -> None:
    counts = Counter(row.domain for row in rows)
    missing = sorted(set(counts) - set(teacher_domains))
    if missing:
        details = ", ".join(
            f"'{d}' ({counts[d]} rows, first at row {next(r.index for r in rows if r.domain == d) + 1})" for d in missing
        )
        raise StartupError(
            f"{data_path}: domain(s) with no teacher: {details}. Configured teacher domains: {sorted(teacher_domains)}. "
            "Add a teacher for each domain (or set data.default_domain for rows without one); opd does not fall "
            "back to another teacher."
        )


def check_same_vocabulary(student_tokenizer, other_tokenizer, key: str) -> None:
    """Teacher and reference must map every token string to the same id as the student."""
    student_vocab, other_vocab = student_tokenizer.get_vocab(), other_tokenizer.get_vocab()
    if student_vocab == other_vocab:
        return
    differing = sorted(
        token for token in set(student_vocab) | set(other_vocab) if student_vocab.get(token) != other_vocab.get(token)
    )
    examples = ", ".join(f"{t!r}: student {student_vocab.get(t)} vs {other_vocab.get(t)}" for t in differing[:5])
    raise StartupError(
        f"{key}: the tokenizer's vocabulary differs from the student's ({len(student_vocab)} vs {len(other_vocab)} "
        f"tokens, {len(differing)} differ; e.g. {examples}). On-policy distillation scores the student's token ids "
        "with the teacher, so both must share one vocabulary."
    )


def check_same_end_of_sequence(student_ids: tuple[int, ...], other_ids: tuple[int, ...], key: str,
                               path: str) -> None:
    """A teacher that ends its responses with other ids than the student's is scored (and writes prefixes)
    against a stop the student never learns: responses grow without end (ms-swift #9526)."""
    if student_ids != other_ids:
        raise StartupError(
            f"{key}: its end-of-sequence ids {list(other_ids)} (tokenizer eos_token and {path}/generation_config.json) "
            f"differ from the student's {list(student_ids)}; give both models the same eos_token_id (tokenizer_config "
            "and generation_config.json)")


def check_output_width(student_width: int, other_width: int, vocabulary_size: int, key: str, needs_topk: bool,
                       drop_padded: bool = False) -> None:
    """Output heads may be padded past the tokenizer, but every real token needs a logit in both.
    `drop_padded`: teachers.N.drop_padded_logits, the teacher's logits past the student's width dropped."""
    if other_width < vocabulary_size:
        raise StartupError(f"{key}: the model has {other_width} output logits for {vocabulary_size} tokens")
    option = f"{key.removesuffix('.path')}.drop_padded_logits"
    if drop_padded and other_width <= student_width:
        raise StartupError(f"{option}: set, but the model has {other_width} output logits, no more than the "
                           f"student's {student_width}: there is nothing to drop; remove the option")
    if needs_topk and other_width > student_width and not drop_padded:
        raise StartupError(
            f"{key}: the model has {other_width} output logits but the student only {student_width}; its top-k "
            f"could name ids the student cannot score. If both share one tokenizer (the ids past "
            f"{student_width} are padding no model here emits), set {option}: true to drop them and "
            "renormalise the teacher over the rest (exact; the mass dropped is logged)"
        )


def check_same_prompt_rendering(student: tuple, teacher: tuple, rows: list[PromptRow], prompt_format: str,
                                key: str, data_path: str) -> None:
    """Without its own template, a teacher must read each prompt as exactly the student's token ids.
    `student`, `teacher`: (tokenizer, chat_template_kwargs), each rendering as it does in the run."""
    (student_tokenizer, student_kwargs), (teacher_tokenizer, teacher_kwargs) = student, teacher
    for row in rows[:TEMPLATE_PROBE_ROWS]:
        student_ids = render_prompt(student_tokenizer, row.messages, prompt_format, student_kwargs)
        teacher_ids = render_prompt(teacher_tokenizer, row.messages, prompt_format, teacher_kwargs)
        if student_ids == teacher_ids:
            continue
        position = next(
            (i for i, (a, b) in enumerate(zip(student_ids, teacher_ids)) if a != b), min(len(student_ids), len(teacher_ids))
        )
        student_piece = student_tokenizer.decode(student_ids[position : position + 8])
        teacher_piece = teacher_tokenizer.decode(teacher_ids[position : position + 8])
        raise StartupError(
            f"{key}: its chat template renders {data_path} row {row.index + 1} to different token ids than the "
            f"student's (first difference at token {position}: student {student_piece!r} vs teacher "
            f"{teacher_piece!r}; chat_template_kwargs: student {student_kwargs}, teacher {teacher_kwargs}). Set "
            f"{key}.chat_template_kwargs to render them alike, or {key}.chat_template to render prompts with a "
            "template of the teacher's own."
        )


def check_topk(topk: int, vocabulary_size: int, needs_topk: bool) -> None:
    """The teacher's top-k must fit in the vocabulary (known once the student's tokenizer loads)."""
    if needs_topk and topk > vocabulary_size:
        raise StartupError(f"objective.topk={topk} is more than the vocabulary's {vocabulary_size} tokens")


def check_grader_fields(rows: list[PromptRow], graders: dict[str, tuple[str, str]], data_path: str) -> None:
    """Every row a grader will grade carries the field it reads, of the type it reads, checked before any
    model loads (not when the row is first sampled). `graders`: domain -> (config key, grader name)."""
    for row in rows:
        if row.domain not in graders:
            continue
        key, name = graders[row.domain]
        if name == "code":
            field, problem = "tests", _tests_problem(row.tests)
        elif name not in ("exact", "math"):  # a custom grader reads what it reads; its errors name the row
            continue
        else:
            field, problem = "answer", _answer_problem(row.answer)
        if problem:
            where = row.where or f"{data_path}: row {row.index + 1}"
            raise DataError(f"{where}: '{field}' {problem}; {key}={name} grades domain '{row.domain}' by it")


def _answer_problem(answer) -> str | None:
    """exact and math compare the answer as text; an integer is unambiguous, a float (19.0 vs 19) is not."""
    if answer is None:
        return "is missing"
    if isinstance(answer, bool) or not isinstance(answer, (str, int)):
        return f"must be text (or an integer), got {answer!r} ({type(answer).__name__})"
    if isinstance(answer, str) and not answer.strip():
        return "is empty"
    return None


def _tests_problem(tests) -> str | None:
    """code runs the tests as a program: text, or a list of lines of text."""
    if tests is None:
        return "is missing"
    if isinstance(tests, str):
        return None if tests.strip() else "is empty"
    if isinstance(tests, list) and tests and all(isinstance(line, str) for line in tests):
        return None
    return f"must be test code (text, or a non-empty list of text lines), got {tests!r}"
