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

CHECKPOINTS = "checkpoints"
_PREFIX = "step_"


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointRecord:
    step: int  # optimizer steps completed
    skipped_steps: int  # non-finite steps skipped so far
    data_position: int  # prompts consumed so far (informational: the data order is a function of step)


def save_checkpoint(run_dir: Path, student, tokenizer, optimizer, record: CheckpointRecord, keep: int) -> Path:
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{record.step:06d}"
    partial = root / f".partial-{final.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    student.save_pretrained(str(partial / "model"))
    tokenizer.save_pretrained(str(partial / "model"))
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(_rng_states(), partial / "rng.pt")
    (partial / "record.json").write_text(json.dumps(_record_dict(record)))
    _fsync_tree(partial)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    _prune(root, keep)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (partial ones never have the final name)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "record.json").is_file())
    return complete[-1] if complete else None


def load_checkpoint_state(folder: Path, optimizer) -> CheckpointRecord:
    """Restore optimizer and RNG states from `folder` (the model is loaded from folder/'model')."""
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
    _set_rng_states(torch.load(folder / "rng.pt", weights_only=False))
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
