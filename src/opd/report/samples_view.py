"""samples.jsonl as the report's token-level view: each logged response's tokens coloured by lT - lS, and per
domain the tokens where teacher and student disagree most.

A 1000-step run can log thousands of samples, so the file is read as a stream: one pass keeps each line's
offset and, per domain, the largest |lT - lS| over every logged token; the token views are then read back
only for `MAX_SAMPLE_STEPS` steps spread over the run (first and last included), at most
`MAX_SAMPLES_PER_STEP` per domain and step and `MAX_TOKENS_PER_SAMPLE` tokens each. Every cap that cut
something is reported on the page (`SampleViews.notes`).
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path

MAX_SAMPLE_STEPS = 12
MAX_SAMPLES_PER_STEP = 4  # per domain
MAX_TOKENS_PER_SAMPLE = 1500
TOP_DISAGREEMENTS = 20  # per domain, over every logged token
CONTEXT_TOKENS = 6  # shown either side of a disagreeing token


class SamplesError(ValueError):
    pass


@dataclass(frozen=True, kw_only=True, slots=True)
class Disagreement:
    """One token with a large |lT - lS|, with the response text around it."""

    delta: float  # lT - lS
    step: int
    prompt_index: int
    token: dict  # the token's record from samples.jsonl
    before: str
    after: str


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleViews:
    """What the page shows of samples.jsonl (records as written by opd.samples.sample_record)."""

    domains: tuple[str, ...]
    logged_steps: tuple[int, ...]
    shown_steps: tuple[int, ...]
    records: tuple[dict, ...]  # of the shown steps, in file order, capped per domain and step
    disagreements: dict[str, list[Disagreement]]  # domain -> largest |lT - lS| first
    scale: float  # |lT - lS| at which the colour saturates
    notes: tuple[str, ...]  # what was capped


def delta(token: dict) -> float | None:
    """lT - lS of a token, None where the step has no teacher value (or no student value)."""
    if token.get("lT") is None or token.get("lS") is None:
        return None
    return float(token["lT"]) - float(token["lS"])


def read_samples(path: Path) -> SampleViews:
    steps, domains, heaps = _index(path)
    logged = tuple(sorted(steps))
    shown = spread(logged, MAX_SAMPLE_STEPS)
    records, notes = _shown_records(path, [offset for step in shown for offset in steps[step]])
    if len(shown) < len(logged):
        notes.insert(0, f"{len(logged)} steps logged samples; the token views show {len(shown)} of them, spread "
                        f"over the run (first and last included); the disagreement lists cover every step")
    deltas = sorted(abs(value) for record in records for token in record["tokens"]
                    if (value := delta(token)) is not None)
    scale = max(deltas[int(0.98 * (len(deltas) - 1))] if deltas else 0.0, 1e-3)
    disagreements = {domain: [item for _, _, item in sorted(heaps[domain], reverse=True)] for domain in domains}
    return SampleViews(domains=tuple(sorted(domains)), logged_steps=logged, shown_steps=shown,
                       records=tuple(records), disagreements=disagreements, scale=scale, notes=tuple(notes))


def spread(steps: tuple[int, ...], count: int) -> tuple[int, ...]:
    """At most `count` of `steps`, evenly spaced, always with the first and the last."""
    if len(steps) <= count:
        return steps
    chosen = {steps[round(index * (len(steps) - 1) / (count - 1))] for index in range(count)}
    return tuple(sorted(chosen))


def _index(path: Path):
    """One pass: byte offset of each record per step, domains, and per domain a bounded heap of the largest
    |lT - lS| (entries (|delta|, order, Disagreement))."""
    steps: dict[int, list[int]] = {}
    domains: set[str] = set()
    heaps: dict[str, list] = {}
    order = 0
    with path.open("rb") as handle:
        number, offset = 0, 0
        for line in handle:
            number += 1
            record = _parse(path, number, line)
            if record is not None:
                steps.setdefault(record["step"], []).append(offset)
                domains.add(record["domain"])
                for item in _disagreements_of(record):
                    order += 1
                    heap = heaps.setdefault(record["domain"], [])
                    entry = (abs(item.delta), -order, item)  # ties: the earlier token ranks first
                    (heapq.heappush if len(heap) < TOP_DISAGREEMENTS else heapq.heappushpop)(heap, entry)
            offset += len(line)
    for domain in domains:
        heaps.setdefault(domain, [])
    return steps, domains, heaps


def _parse(path: Path, number: int, line: bytes) -> dict | None:
    """A record, None for a blank line or a torn last line (a run still writing); anything else wrong stops
    the report naming the file and the line."""
    if not line.strip():
        return None
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        if not line.endswith(b"\n"):
            return None
        raise SamplesError(f"{path}: line {number} is not JSON; opd writes whole lines only, so the file was "
                           "changed by something else. Repair or remove that line") from None
    problems = [field for field, kind in (("step", int), ("domain", str), ("tokens", list), ("prompt", str))
                if not isinstance(record.get(field) if isinstance(record, dict) else None, kind)]
    if problems:
        raise SamplesError(f"{path}: line {number} is not a sample record (missing or wrong: "
                           f"{', '.join(problems)}); see src/opd/samples.py for the fields opd writes")
    return record


def _disagreements_of(record: dict) -> list[Disagreement]:
    tokens = record["tokens"]
    items = []
    for position, token in enumerate(tokens):
        value = delta(token)
        if value is None:
            continue
        before = "".join(t["text"] for t in tokens[max(0, position - CONTEXT_TOKENS):position])
        after = "".join(t["text"] for t in tokens[position + 1:position + 1 + CONTEXT_TOKENS])
        items.append(Disagreement(delta=value, step=record["step"], prompt_index=record.get("prompt_index", -1),
                                  token=token, before=before, after=after))
    # Only the record's own largest can enter a per-domain top list: keeps the heap work per line small.
    return sorted(items, key=lambda item: -abs(item.delta))[:TOP_DISAGREEMENTS]


def _shown_records(path: Path, offsets: list[int]) -> tuple[list[dict], list[str]]:
    """The records at `offsets`, at most MAX_SAMPLES_PER_STEP per (step, domain), long responses cut."""
    kept: list[dict] = []
    per_cell: dict[tuple[int, str], int] = {}
    dropped, cut = 0, 0
    with path.open("rb") as handle:
        for offset in sorted(offsets):
            handle.seek(offset)
            record = json.loads(handle.readline().decode("utf-8"))
            cell = (record["step"], record["domain"])
            per_cell[cell] = per_cell.get(cell, 0) + 1
            if per_cell[cell] > MAX_SAMPLES_PER_STEP:
                dropped += 1
                continue
            if len(record["tokens"]) > MAX_TOKENS_PER_SAMPLE:
                cut += 1
                record = {**record, "tokens": record["tokens"][:MAX_TOKENS_PER_SAMPLE], "cut": True}
            kept.append(record)
    notes = []
    if dropped:
        notes.append(f"{dropped} sample(s) not shown: at most {MAX_SAMPLES_PER_STEP} per domain and step")
    if cut:
        notes.append(f"{cut} response(s) shown up to their first {MAX_TOKENS_PER_SAMPLE} tokens")
    return kept, notes
