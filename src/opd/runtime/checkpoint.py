"""Atomic checkpoints and resume.

A checkpoint is a folder `checkpoints/step_000123/` holding the student as an ordinary `save_pretrained`
folder (`model/`, loadable by any HF tool), the optimizer state, every RNG state and a small JSON record.
It is written under a temporary name and renamed into place only when complete, so a crash mid-write
leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from opd.runtime import distributed
from opd.runtime.lora import is_adapted, save_adapter, save_merged

CHECKPOINTS = "checkpoints"
_PREFIX = "step_"


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
    partial = root / f".partial-{final.name}"
    if distributed.is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    distributed.barrier()
    torch.save(_rng_states(), partial / f"rng_{distributed.rank()}.pt")  # each rank's own streams
    torch.save(rank_state or {}, partial / f"state_{distributed.rank()}.pt")
    if is_adapted(student):
        save_adapter(student, partial / "adapter")  # resume loads the base from student.path plus this
    else:
        save_model(student, tokenizer, partial / "model")
    if distributed.world_size() > 1:
        optimizer_state = distributed.full_optimizer_state(student, optimizer)
    else:
        optimizer_state = optimizer.state_dict()
    if distributed.is_main():
        torch.save(optimizer_state, partial / "optimizer.pt")
        (partial / "record.json").write_text(json.dumps(_record_dict(record)))
        _fsync_tree(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _prune(root, keep)
    distributed.barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (partial ones never have the final name)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "record.json").is_file())
    return complete[-1] if complete else None


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


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
