"""`opd bench step`'s packed-vs-padded and grouped-vs-consecutive variants: the same training step on one
rollout batch whose response lengths vary widely, with `optim.pack_sequences: false` (`opd-padded`) and
`true` (`opd-packed`), one micro-batch each; and in four padded micro-batches, of consecutive rows
(`optim.group_by_length: false`, `opd-consecutive`) and of rows grouped by length (`true`, `opd-grouped`).
Each pair is measured side by side in one run.

Random tiny models practically never sample an end-of-sequence token, so the batch's lengths are set: the
student samples max_new_tokens for every prompt (opd's own `collect`), then each row is cut as if it had
stopped there, at lengths spread log-uniformly from MIN_RESPONSE_TOKENS to max_new_tokens (most responses
short, a few at the cap: the long tail of reasoning rollouts, where padding to the longest costs most),
given to the rows in a fixed shuffled order (sampled rows do not arrive sorted).
Each variant, in a fresh process, assembles the run from its config (the models of `bench/step.py`, the
in-process teacher packed or padded with the student) and runs opd's own step functions on that batch
(`score_batch`, then `train_step`: forward, loss, backward, AdamW), one warm-up step then the timed ones.
The two variants run in turn, a few rounds of each. Figures per timed step: training = `train_step`
seconds, scoring = `score_batch` seconds (the teacher's forward), each the fastest over all rounds' timed
steps (other work on the machine only ever adds time; the medians are printed beside them); memory = the
peak resident set over the steps above the one before them (models, optimizer and batch allocated; Linux's
resettable high-water mark), the median over the rounds.
What it leaves out: generation (the batch is fixed), and GPU kernels (on the CPU, packed attention is the
block-diagonal mask over the packed row: see packing.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from opd.bench import run_in_subprocess, unmeasured_row

# torch and the opd trainer are imported inside `run_variant`, in the variant's own process, so that the
# parent (which only builds the models) stays small and each variant's memory is its own.

# Two pairs, each judged within itself: one micro-batch padded against packed, and four micro-batches of
# consecutive rows against four of rows grouped by length (`optim.group_by_length`), both padded.
PAIRS = (("opd-padded", "opd-packed"), ("opd-consecutive", "opd-grouped"))
VARIANTS = tuple(variant for pair in PAIRS for variant in pair)
GROUPED_MICRO_BATCHES = 4
MIN_RESPONSE_TOKENS = 2  # the shortest response: an answer and its end-of-sequence token


def response_lengths(rows: int, max_new_tokens: int) -> list[int]:
    """Log-uniform lengths from MIN_RESPONSE_TOKENS to max_new_tokens, shortest first, the last at the cap."""
    low = min(MIN_RESPONSE_TOKENS, max_new_tokens)
    if rows == 1:
        return [max_new_tokens]
    ratio = max_new_tokens / low
    return [round(low * ratio ** (row / (rows - 1))) for row in range(rows)]


def run(size: dict, build: Callable[[Path, dict], list[str]], rounds: int,
        variants: tuple[str, ...] = VARIANTS) -> list[dict]:
    """Both variants of each pair asked for (a pair runs whole) on the models and prompts `build` writes
    (bench/step.py's), each in a fresh process, `rounds` times in turn (padded, packed, padded, ...), so that
    work sharing the machine for a while slows neither variant alone."""
    chosen = [variant for pair in PAIRS if set(pair) & set(variants) for variant in pair]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        prompts = build(root, size)
        (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        measured = [run_in_subprocess("opd.bench.packed_step", variant, str(root), json.dumps(size), timeout=1800)
                    for _ in range(rounds) for variant in chosen]
    return [combine_rounds([row for row in measured if row["variant"] == variant]) for variant in chosen]


def batch_lengths(rows: int, max_new_tokens: int) -> list[int]:
    """`response_lengths` in a fixed shuffled order: sampled rows do not arrive sorted, so consecutive
    micro-batches mix short and long rows."""
    lengths = response_lengths(rows, max_new_tokens)
    random.Random(0).shuffle(lengths)
    return lengths


def combine_rounds(rows: list[dict]) -> dict:
    """One variant's rounds as one row: the fastest and the median of the per-step times over all rounds,
    the median of the rounds' peaks; the first failed round's error if any failed (a variant is measured
    whole or not at all)."""
    failed = [row for row in rows if "error" in row]
    if failed:
        return failed[0]
    first = rows[0]
    scoring = [seconds for row in rows for seconds in row["scoring_seconds_per_step"]]
    training = [seconds for row in rows for seconds in row["training_seconds_per_step"]]
    return {**{key: first[key] for key in ("variant", "size", "first_loss", "response_tokens", "forward_tokens")},
            "rounds": len(rows), "steps": len(training),
            # Other work only ever adds time to a step: the fastest is the variant's own cost.
            "training_seconds": min(training), "scoring_seconds": min(scoring),
            "training_seconds_median": statistics.median(training),
            "scoring_seconds_median": statistics.median(scoring),
            "peak_extra_bytes": statistics.median(row["peak_extra_bytes"] for row in rows),
            "per_round": [{key: row[key] for key in ("scoring_seconds_per_step", "training_seconds_per_step",
                                                     "peak_extra_bytes", "first_loss")} for row in rows]}


def run_variant(variant: str, root: Path, size: dict) -> dict:
    """In the variant's own process: assemble the run, cut one sampled batch, then score and train on it
    steps + 1 times; the per-step seconds, the peak, the first step's loss and the token counts."""
    import torch

    from opd.assemble import assemble, seed_everything
    from opd.collect import collect
    from opd.config import load_config
    from opd.teachers import score_batch
    from opd.train import TrainState, build_optimizer, train_step

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {list(VARIANTS)}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    config = load_config(base={
        "student": {"path": str(root / "student")},
        "teachers": [{"domain": "default", "path": str(root / "teacher"), "reference": None}],
        "data": {"path": str(root / "prompts.jsonl"), "shuffle": False},
        "rollout": {"prompts_per_step": size["prompts"], "samples_per_prompt": 1, "max_new_tokens": size["new_tokens"],
                    "batch_size": size["prompts"]},
        "objective": {"name": "opd"},
        "optim": {"lr": 1e-5, "pack_sequences": variant == "opd-packed",
                  "micro_batch_size": size["prompts"] if variant in PAIRS[0]
                  else max(size["prompts"] // GROUPED_MICRO_BATCHES, 1),
                  "group_by_length": variant != "opd-consecutive"},
        "train": {"steps": size["steps"] + 1, "output_dir": str(root / variant), "save_every": 0,
                  "tensorboard": False, "progress": False},
    })
    seed_everything(config.train.seed)  # both variants sample the same batch
    run = assemble(config)
    try:
        sampled = collect(run, 0, list(range(size["prompts"])), {})
        batch = cut_responses(sampled, batch_lengths(size["prompts"], size["new_tokens"]),
                              run.sampling.pad_id)
        state = TrainState(student=run.student, optimizer=build_optimizer(run.student, config.optim))
        resting = reset_peak_resident_bytes()
        timings, losses = [], []
        for _ in range(size["steps"] + 1):  # the first is the warm-up
            started = time.perf_counter()
            teacher = score_batch(batch, run.scorers, run.scoring)
            scored = time.perf_counter()
            metrics = train_step(state, batch, teacher, run.objective, run.step)
            timings.append((scored - started, time.perf_counter() - scored))
            losses.append(metrics["loss"].value)
        peak = peak_resident_bytes()
    finally:
        run.close()
    timed = timings[1:]
    return {"variant": variant, "size": size,
            "scoring_seconds_per_step": [scoring for scoring, _ in timed],
            "training_seconds_per_step": [training for _, training in timed],
            "peak_extra_bytes": peak - resting, "first_loss": losses[0],
            "response_tokens": int(batch.response_mask.sum()),
            "forward_tokens": training_forward_tokens(batch, run.step)}


def training_forward_tokens(batch, settings) -> int:
    """Tokens the training forwards run on: real tokens when packed, else each micro-batch's rows times
    the columns they use (scoring.used_columns: a forward is cut to its own rows' width)."""
    from opd.packing import forward_tokens
    from opd.scoring import used_columns
    from opd.train import micro_batch_rows

    if settings.packed:
        return sum(forward_tokens(batch.prompt_mask, batch.response_mask, True))
    total = 0
    for rows in micro_batch_rows(batch, settings):
        start, width = used_columns(batch.prompt_mask[rows], batch.response_mask[rows])
        total += len(rows) * (batch.prompt_mask.shape[1] - start + width)
    return total


def cut_responses(batch, lengths: list[int], pad_id: int):
    """`batch` with row i's response cut to lengths[i] tokens, as if the student had stopped there: the
    ids after the cut are padding, and every per-token record is zero there, as rollout/batch.py leaves it."""
    import torch

    from opd.rollout.batch import rank_in_batch

    width = batch.response_ids.shape[1]
    if max(lengths) > width:
        raise ValueError(f"cut_responses: a length of {max(lengths)} exceeds the sampled {width} tokens")
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    entropy = batch.sampler_entropy.masked_fill(~mask, 0.0) if batch.sampler_entropy is not None else None
    sampled = mask & ~batch.from_teacher
    return dataclasses.replace(
        batch, response_ids=batch.response_ids.masked_fill(~mask, pad_id), response_mask=mask,
        from_teacher=batch.from_teacher & mask, sampler_logprobs=batch.sampler_logprobs.masked_fill(~mask, 0.0),
        truncated=torch.tensor(lengths) == width, sampler_entropy=entropy,
        entropy_rank=rank_in_batch(entropy, sampled) if entropy is not None else None)


def reset_peak_resident_bytes() -> int:
    """Reset this process's resident high-water mark (Linux's clear_refs "5"); returns the resident bytes now."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_bytes("VmRSS")


def peak_resident_bytes() -> int:
    """The resident high-water mark since the last reset."""
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE).group(1)) * 1024


def format_table(results: list[dict]) -> str:
    by_name = {r["variant"]: r for r in results}
    lines = ["| variant | forward tokens | training s (fastest, median) | scoring s (fastest, median) | peak extra MiB |",
             "|---|---:|---:|---:|---:|"]
    for name in [variant for pair in PAIRS if set(pair) & set(by_name) for variant in pair]:
        row = by_name.get(name)
        missing = unmeasured_row(name, row, 4)
        if missing:
            lines.append(missing)
            continue
        lines.append(f"| {name} | {row['forward_tokens']} | {row['training_seconds']:.3f}, "
                     f"{row['training_seconds_median']:.3f} | {row['scoring_seconds']:.3f}, "
                     f"{row['scoring_seconds_median']:.3f} | {row['peak_extra_bytes'] / 2**20:.1f} |")
    padded, packed = by_name.get("opd-padded"), by_name.get("opd-packed")
    if padded and packed and "error" not in padded and "error" not in packed:
        lines.append(_pair_line("padded / packed", padded, packed, ("padded", "packed"),
                                f". {packed['response_tokens']} response tokens in {packed['rounds']} rounds of "
                                f"{packed['steps'] // packed['rounds']} timed steps"))
    consecutive, grouped = by_name.get("opd-consecutive"), by_name.get("opd-grouped")
    if consecutive and grouped and "error" not in consecutive and "error" not in grouped:
        lines.append(_pair_line(f"consecutive / grouped ({GROUPED_MICRO_BATCHES} micro-batches)", consecutive, grouped,
                                ("consecutive", "grouped"), ""))
    return "\n".join(lines)


def _pair_line(title: str, base: dict, other: dict, names: tuple[str, str], note: str) -> str:
    """One pair's ratios (base over other: above 1, `other` is faster or smaller) and whether its first
    step's loss agrees."""
    same = math.isclose(base["first_loss"], other["first_loss"], rel_tol=1e-4, abs_tol=1e-6)
    return (f"\n{title}: training time {base['training_seconds'] / other['training_seconds']:.2f}, "
            f"scoring time {base['scoring_seconds'] / other['scoring_seconds']:.2f}, "
            f"peak extra memory {base['peak_extra_bytes'] / max(other['peak_extra_bytes'], 1):.2f} (fastest steps; "
            f"medians: training {base['training_seconds_median'] / other['training_seconds_median']:.2f}, "
            f"scoring {base['scoring_seconds_median'] / other['scoring_seconds_median']:.2f}){note}; first-step loss "
            f"{'the same' if same else 'DIFFERS'}: {base['first_loss']:.6f} {names[0]}, "
            f"{other['first_loss']:.6f} {names[1]}")


if __name__ == "__main__":
    print(json.dumps(run_variant(sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]))))
