"""Shared fixtures: tiny real HF model folders built once per test session, and config helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd.config import load_config
from opd.runtime.tiny import build_model, build_tokenizer, perturb_model
from served_support import served_models, servers  # noqa: F401 (session fixtures: vLLM servers)

torch.set_num_threads(1)  # 2-core CI: tests run in one thread; determinism is easier to reason about

PROMPTS = [
    {"prompt": "what is 12 + 7?", "domain": "math", "answer": "19"},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count the letters"}],
     "domain": "code"},
    {"prompt": "the quick brown fox", "domain": "math"},
    {"prompt": "hello world, repeat it", "domain": "code"},
    {"prompt": "what is 3 * 4?", "domain": "math", "answer": "12"},
    {"prompt": "jumps over the lazy dog", "domain": "code"},
]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """student/, teacher/ (a perturbed student), teacher_b/, base/ (another init): one shared tokenizer."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = build_tokenizer(root / "student")
    build_model(root / "student", tokenizer, hidden_size=32, num_layers=2, seed=0)
    perturb_model(root / "student", root / "teacher", scale=1.0, seed=1)
    perturb_model(root / "student", root / "teacher_b", scale=1.0, seed=2)
    build_model(root / "base", tokenizer, hidden_size=32, num_layers=2, seed=3)
    return root


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    return path


def make_config(model_dir: Path, prompts_file: Path, output_dir: Path, **sections):
    """A small two-domain config; `sections` replace or extend top-level sections."""
    base = {
        "student": {"path": str(model_dir / "student")},
        "teachers": [
            {"domain": "math", "path": str(model_dir / "teacher")},
            {"domain": "code", "path": str(model_dir / "teacher_b")},
        ],
        "data": {"path": str(prompts_file)},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8},
        "objective": {"name": "gopd", "lam": 1.25},
        "optim": {"lr": 1e-3, "micro_batch_size": 2},
        "train": {"steps": 3, "output_dir": str(output_dir), "save_every": 0, "tensorboard": False,
                  "progress": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_config(base=base)
