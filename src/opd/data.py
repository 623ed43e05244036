"""Prompt datasets: local .jsonl or .parquet files, validated row by row at start-up.

Row schema: `prompt` (text, or chat messages [{"role", "content"}, ...]), optional `domain` (selects the
teacher), optional `answer` and `tests` (kept for graders), any other keys kept in `extra`.
JSON lines are parsed here, line by line, so a malformed line is reported with its line number (and rows
may mix text and chat prompts, which an Arrow schema would reject); parquet goes through `datasets`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A dataset problem, reported with the file and row (1-based line number for jsonl)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PromptRow:
    index: int  # 0-based position in the dataset
    prompt: str | tuple[dict[str, str], ...]  # text, or chat messages
    domain: str
    answer: Any = None
    tests: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # "file:line" (jsonl) or "file: row N" (parquet), for messages about this row

    @property
    def messages(self) -> str | list[dict[str, str]]:
        return self.prompt if isinstance(self.prompt, str) else [dict(m) for m in self.prompt]


def keep_rows(rows: list[PromptRow], keep: list[bool]) -> list[PromptRow]:
    """The rows marked to keep, renumbered 0.. (positions are the rows' keys in a run), each still naming
    its place in the file for messages."""
    kept = [row for row, wanted in zip(rows, keep, strict=True) if wanted]
    return [replace(row, index=position, where=row.where or f"row {row.index + 1}")
            for position, row in enumerate(kept)]


def load_prompts(path: str, default_domain: str = "default") -> list[PromptRow]:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data.path: '{path}' is not a file")
    if file.suffix in (".jsonl", ".json"):
        records = _read_jsonl(file)
    elif file.suffix == ".parquet":
        import datasets  # heavy (pyarrow); only parquet files need it

        dataset = datasets.Dataset.from_parquet(str(file))
        records = [(f"{file}: row {i + 1}", dict(record)) for i, record in enumerate(dataset)]
    else:
        raise DataError(f"data.path: '{path}' must end in .jsonl or .parquet")
    rows = [_parse_row(where, record, i, default_domain) for i, (where, record) in enumerate(records)]
    if not rows:
        raise DataError(f"{file}: no prompts")
    return rows


def _read_jsonl(file: Path) -> list[tuple[str, dict]]:
    records = []
    with file.open("rb") as handle:  # decoded line by line, so a non-UTF-8 line is reported by its number
        for line_number, raw in enumerate(handle, start=1):
            where = f"{file}:{line_number}"
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at byte {error.start + 1} "
                                "of the line); JSON lines must be UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            records.append((where, record))
    return records


def _parse_row(where: str, record: Any, index: int, default_domain: str) -> PromptRow:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    if "prompt" not in record:
        raise DataError(f"{where}: missing 'prompt' (keys present: {sorted(record)})")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: 'prompt' is empty")
    elif isinstance(prompt, list) and prompt:
        for position, message in enumerate(prompt):
            if not isinstance(message, dict) or set(message) - {"role", "content"} or "content" not in message:
                raise DataError(f"{where}: prompt[{position}] must be {{'role': ..., 'content': ...}}, got {message!r}")
            if message.get("role") not in ROLES or not isinstance(message["content"], str):
                raise DataError(f"{where}: prompt[{position}] needs role in {list(ROLES)} and text content")
        prompt = tuple({"role": m["role"], "content": m["content"]} for m in prompt)
    else:
        raise DataError(f"{where}: 'prompt' must be text or a non-empty list of chat messages, got {prompt!r}")
    domain = record.get("domain")
    if domain is None:
        domain = default_domain
    elif not isinstance(domain, str) or not domain:
        raise DataError(f"{where}: 'domain' must be a non-empty string, got {domain!r}")
    extra = {k: v for k, v in record.items() if k not in ("prompt", "domain", "answer", "tests")}
    return PromptRow(index=index, prompt=prompt, domain=domain, answer=record.get("answer"),
                     tests=record.get("tests"), extra=extra, where=where)


def prompts_for_step(num_rows: int, step: int, prompts_per_step: int, seed: int, shuffle: bool) -> list[int]:
    """Dataset indices for a step: a deterministic function of (seed, step), so resuming needs no state.

    Epoch e visits a permutation seeded by (seed, e); steps walk through epochs back to back.
    """
    indices = []
    position = step * prompts_per_step
    while len(indices) < prompts_per_step:
        epoch, offset = divmod(position, num_rows)
        if shuffle:
            order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        else:
            order = torch.arange(num_rows)
        take = min(prompts_per_step - len(indices), num_rows - offset)
        indices.extend(int(i) for i in order[offset : offset + take])
        position += take
    return indices
