"""Atomic checkpoints and resume.

A checkpoint is a folder `checkpoints/step_000123/` holding the student as an ordinary `save_pretrained`
folder (`model/`, loadable by any HF tool), the optimizer state, every RNG state and a small JSON record.
It is written under a temporary name and renamed into place only when complete, so a crash mid-write
leaves the previous checkpoint as the newest complete one; pruning renames a checkpoint away before it
deletes it, and `final/` (and the evaluation's `eval_model/`) is written the same way (runtime/run_folder.py).
Nothing is written from non-finite weights, and a full disk names the folder and the step.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from opd.runtime import distributed
from opd.runtime.lora import is_adapted, save_adapter, save_merged
from opd.runtime.run_folder import PARTIAL, fsync_folder, fsync_tree, remove_folder, replace_folder, writing

CHECKPOINTS = "checkpoints"
FINAL = "final"
_PREFIX = "step_"


class NonFiniteWeightsError(ValueError):
    pass


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointRecord:
    step: int  # optimizer steps completed
    skipped_steps: int  # non-finite steps skipped so far
    data_position: int  # prompts consumed so far (informational: the data order is a function of step)


def save_model(student, tokenizer, folder: Path) -> None:
    """The student as an HF folder; under FSDP every rank gathers, rank 0 writes. A LoRA student is
    written merged (an ordinary HF folder) with its adapter beside it in `<folder>_adapter`."""
    if is_adapted(student):
        save_merged(student, folder)
        save_adapter(student, folder.with_name(folder.name + "_adapter"))
        tokenizer.save_pretrained(str(folder))
        return
    state = distributed.full_state_dict(student)
    if distributed.is_main():
        student.save_pretrained(str(folder), state_dict=state)
        tokenizer.save_pretrained(str(folder))
    distributed.barrier()


def save_checkpoint(run_dir: Path, student, tokenizer, optimizer, record: CheckpointRecord, keep: int,
                    rank_state: dict | None = None) -> Path:
    """Every rank must call this (the model and optimizer are gathered); rank 0 writes and renames.

    `rank_state` is this rank's own extra state (e.g. sft's cached teacher responses), restored on resume.
    """
    root = run_dir / CHECKPOINTS
    final = root / f"{_PREFIX}{record.step:06d}"
    partial = root / f"{PARTIAL}{final.name}"
    check_finite_weights(student, record.step, final)
    if distributed.is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    distributed.barrier()
    with writing(final, record.step, partial=(partial,)):
        _save_torch(_rng_states(), partial / f"rng_{distributed.rank()}.pt")  # each rank's own streams
        _save_torch(rank_state or {}, partial / f"state_{distributed.rank()}.pt")
        if is_adapted(student):
            save_adapter(student, partial / "adapter")  # resume loads the base from student.path plus this
        else:
            save_model(student, tokenizer, partial / "model")
        if distributed.world_size() > 1:
            optimizer_state = distributed.full_optimizer_state(student, optimizer)
        else:
            optimizer_state = optimizer.state_dict()
        if distributed.is_main():
            _save_torch(optimizer_state, partial / "optimizer.pt")
            (partial / "record.json").write_text(json.dumps(_record_dict(record)))
            fsync_tree(partial)
    if distributed.is_main():
        replace_folder(partial, final)
        _prune(root, keep)
    distributed.barrier()
    return final


def save_model_atomically(student, tokenizer, folder: Path, step: int) -> Path:
    """`save_model` into `.partial-<name>`, renamed over `folder` when complete (a LoRA student's
    `<name>_adapter` first, `folder` last). Every rank must call this."""
    partial = folder.with_name(PARTIAL + folder.name)
    partial_adapter, adapter = (f.with_name(f.name + "_adapter") for f in (partial, folder))
    check_finite_weights(student, step, folder)
    if distributed.is_main():
        for path in (partial, partial_adapter):
            shutil.rmtree(path, ignore_errors=True)
    with writing(folder, step, partial=(partial, partial_adapter)):
        save_model(student, tokenizer, partial)
        if distributed.is_main():
            for path in (partial, partial_adapter):
                if path.is_dir():
                    fsync_tree(path)
    if distributed.is_main():
        if partial_adapter.is_dir():
            replace_folder(partial_adapter, adapter)
        replace_folder(partial, folder)
    distributed.barrier()
    return folder


def save_final(run_dir: Path, student, tokenizer, step: int) -> Path:
    """The trained student as `run_dir/final` (an HF folder), replacing an earlier segment's atomically."""
    return save_model_atomically(student, tokenizer, run_dir / FINAL, step)


def check_finite_weights(student, step: int, target: Path) -> None:
    """Refuse to write `target` from weights holding NaN or inf (every rank checks its shards, all agree)."""
    bad, first = 0, None
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            count = int((~torch.isfinite(local)).sum())
            if count and first is None:
                first = f"{name}: {count} of {local.numel()}"
            bad += count
    total = distributed.all_reduce_sum(float(bad))
    if total:
        where = f" (e.g. {first})" if first else ""
        raise NonFiniteWeightsError(
            f"step {step}: the student's weights hold {int(total)} non-finite values{where}; {target} was not "
            "written. A finite gradient still gives non-finite weights with too large a step: lower optim.lr "
            "(or set optim.max_grad_norm) and resume from the newest complete checkpoint"
        )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (partial ones never have the final name)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "record.json").is_file())
    return complete[-1] if complete else None  # `.partial-` and `.deleting-` folders never match


def checkpoint_step(folder: Path) -> int:
    """The optimizer steps a complete checkpoint folder holds (read without loading anything else)."""
    return int(json.loads((folder / "record.json").read_text())["step"])


def load_rank_state(folder: Path) -> dict:
    """This rank's extra state saved with the checkpoint (empty for checkpoints that have none)."""
    path = folder / f"state_{distributed.rank()}.pt"
    return torch.load(path, weights_only=False) if path.is_file() else {}


def load_checkpoint_state(folder: Path, student, optimizer) -> CheckpointRecord:
    """Restore optimizer and RNG states from `folder` (the model is loaded from folder/'model')."""
    optimizer_state = torch.load(folder / "optimizer.pt", weights_only=False)
    if distributed.world_size() > 1:
        distributed.load_full_optimizer_state(student, optimizer, optimizer_state)
    else:
        optimizer.load_state_dict(optimizer_state)
    rng_file = folder / f"rng_{distributed.rank()}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file}: the checkpoint was written by fewer processes than this run has")
    _set_rng_states(torch.load(rng_file, weights_only=False))
    data = json.loads((folder / "record.json").read_text())
    return CheckpointRecord(**data)


def _record_dict(record: CheckpointRecord) -> dict:
    return {"step": record.step, "skipped_steps": record.skipped_steps, "data_position": record.data_position}


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _save_torch(value, path: Path) -> None:
    # Through a Python file: a full disk then surfaces as OSError(ENOSPC) (torch's own writer says only
    # "iostream error").
    with open(path, "wb") as handle:
        torch.save(value, handle)


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX))
    for old in complete[:-keep]:
        remove_folder(old)  # renamed to `.deleting-step_N` first: no checkpoint name is ever half-deleted
    fsync_folder(root)
