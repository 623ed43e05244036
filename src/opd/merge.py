"""ExPO weight extrapolation (Zheng et al. 2025, as used by G-OPD): no training, just arithmetic on weights.

theta = mean(theta_teachers) + alpha * (mean(theta_teachers) - theta_student), written as an HF folder with
the student's config and tokenizer. Every teacher must have exactly the student's parameter names and
shapes (e.g. domain experts trained by RL from that student); anything else is an error naming the tensor.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from opd.runtime.models import load_model, load_tokenizer
from opd.runtime.run_folder import PARTIAL, replace_folder


def expo_merge(teacher_paths: list[str], student_path: str, alpha: float, output_dir: str, *,
               overwrite: bool = False) -> Path:
    """The merged model as an HF folder at `output_dir`; an existing one is refused unless `overwrite`."""
    if not teacher_paths:
        raise ValueError("expo_merge: at least one teacher is needed")
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out: '{out}' already exists; pass --overwrite to replace it, or choose another "
                              "folder (nothing was written)")
    student = load_model(student_path, "float32", key="--student")
    student_state = student.state_dict()
    mean = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in student_state.items()}
    for path in teacher_paths:
        teacher_state = load_model(path, "float32", key="--teachers").state_dict()
        missing = sorted(set(student_state) ^ set(teacher_state))
        if missing:
            raise ValueError(f"expo_merge: {path} and the student differ in parameters, e.g. {missing[:3]}")
        for name, value in teacher_state.items():
            if value.shape != student_state[name].shape:
                raise ValueError(f"expo_merge: {path}: '{name}' has shape {tuple(value.shape)}, the student "
                                 f"{tuple(student_state[name].shape)}")
            mean[name] += value.double() / len(teacher_paths)
    merged = {name: (mean[name] + alpha * (mean[name] - student_state[name].double())).to(student_state[name].dtype)
              for name in student_state}
    student.load_state_dict(merged)
    # Written beside its place and renamed over it: an overwritten folder never mixes old and new files.
    partial = out.with_name(PARTIAL + out.name)
    shutil.rmtree(partial, ignore_errors=True)
    student.save_pretrained(str(partial))
    load_tokenizer(student_path, key="--student").save_pretrained(str(partial))
    replace_folder(partial, out)
    return out
