"""The command line: `opd train` end to end in a subprocess, config errors, example configs, the demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_config

from opd.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "opd", *args], capture_output=True, text=True, cwd=cwd)


def test_opd_train_from_yaml_with_overrides(model_dir, prompts_file, tmp_path):
    config = make_config(model_dir, prompts_file, tmp_path / "run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    result = run_cli("train", str(path), "train.steps=2", "objective.lam=1.5")
    assert result.returncode == 0, result.stderr
    assert "trained student written to" in result.stdout
    recorded = load_config(tmp_path / "run" / "config.yaml")
    assert recorded.train.steps == 2 and recorded.objective.lam == 1.5
    resumed = run_cli("train", str(path), "train.steps=3", "--resume")
    assert resumed.returncode == 0, resumed.stderr


def test_opd_train_reports_a_bad_config_and_exits_nonzero(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("student: {path: s}\nteachers: [{domain: d, path: t}]\ndata: {path: x.jsonl}\noptim: {lr: fast}\n")
    result = run_cli("train", str(path))
    assert result.returncode != 0
    assert "bad.yaml: optim.lr: expected a number, got 'fast'" in result.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    config = load_config(path)
    assert config.teachers


def test_demo_runs_and_the_student_moves_toward_the_teacher(tmp_path):
    from opd.demo import run_demo
    from opd.monitor import read_metrics

    final = run_demo(str(tmp_path / "demo"), steps=12, teacher_steps=60, progress=False)
    records = read_metrics(final.parent / "metrics.jsonl")
    assert len(records) == 12
    first, last = records[0]["teacher/kl_k1"], sum(r["teacher/kl_k1"] for r in records[-3:]) / 3
    assert last < first, (first, last)
