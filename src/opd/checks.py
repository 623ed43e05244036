"""Start-up checks that need the data or the tokenizers, run before any model compute.

Each failure names what is wrong and where (config key, file row, token position). These are the silent
misalignment bugs peers shipped (a teacher reading different token ids than the student: tinker #796,
ms-swift #9429 / #9671), turned into errors.
"""

from __future__ import annotations

from collections import Counter

from opd.data import PromptRow
from opd.runtime.models import render_prompt

# How many dataset prompts are rendered by both tokenizers to compare chat templates.
TEMPLATE_PROBE_ROWS = 32


class StartupError(ValueError):
    pass


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


def check_output_width(student_width: int, other_width: int, vocabulary_size: int, key: str, needs_topk: bool) -> None:
    """Output heads may be padded past the tokenizer, but every real token needs a logit in both."""
    if other_width < vocabulary_size:
        raise StartupError(f"{key}: the model has {other_width} output logits for {vocabulary_size} tokens")
    if needs_topk and other_width > student_width:
        raise StartupError(
            f"{key}: the model has {other_width} output logits but the student only {student_width}; its top-k "
            "could name ids the student cannot score"
        )


def check_same_prompt_rendering(student_tokenizer, teacher_tokenizer, rows: list[PromptRow], prompt_format: str,
                                key: str, data_path: str) -> None:
    """Without its own template, a teacher must read each prompt as exactly the student's token ids."""
    for row in rows[:TEMPLATE_PROBE_ROWS]:
        student_ids = render_prompt(student_tokenizer, row.messages, prompt_format)
        teacher_ids = render_prompt(teacher_tokenizer, row.messages, prompt_format)
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
            f"{teacher_piece!r}). Set {key}.chat_template to render prompts with a template of the teacher's own."
        )
