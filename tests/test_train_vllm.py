"""`opd train` with rollout.backend: vllm (and a vLLM-scored teacher) end to end, against the HF backend."""

from __future__ import annotations

import json
import os
import math
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_config
from safetensors.torch import load_file

from opd.config import to_dict
from opd.runtime.tiny import build_model, build_tokenizer, perturb_model

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """head_dim 32: vLLM's CPU attention has no kernel for the shared fixtures' 16."""
    root = tmp_path_factory.mktemp("vllm_train_models")
    tokenizer = build_tokenizer(root / "student")
    build_model(root / "student", tokenizer, hidden_size=64, num_layers=2, num_heads=2, seed=0)
    perturb_model(root / "student", root / "teacher", scale=1.0, seed=1)
    perturb_model(root / "student", root / "teacher_b", scale=1.0, seed=2)
    return root


def train_in_subprocess(models, prompts_file, folder, backend: str, **sections) -> list[dict]:
    config = make_config(
        models, prompts_file, folder / "run",
        rollout={"backend": backend, "vllm": {"kv_cache_gib": 0.0625}},
        # tropd x ExOPD with teacher-prefix guidance: top-k teacher scores, a reference, prefix continuation.
        objective={"name": "tropd", "tropd": {"advantage": "gopd"}, "guidance": {"enabled": True}},
        teachers=[{"domain": "math", "path": str(models / "teacher"), "backend": backend},
                  {"domain": "code", "path": str(models / "teacher_b")}],
        **sections,
    )
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    result = subprocess.run([sys.executable, "-m", "opd", "train", str(path)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]


def test_three_vllm_steps_give_the_hf_backends_metrics(models, prompts_file, tmp_path):
    (tmp_path / "hf").mkdir(), (tmp_path / "vllm").mkdir()
    hf = train_in_subprocess(models, prompts_file, tmp_path / "hf", "hf")
    vllm = train_in_subprocess(models, prompts_file, tmp_path / "vllm", "vllm")
    assert len(vllm) == len(hf) == 3
    assert [set(record) for record in vllm] == [set(record) for record in hf]
    for record in vllm:
        assert all(math.isfinite(value) for value in record.values() if isinstance(value, float)), record
        assert record["rollout/tokens"] > 0
    # The engine samples from the current policy (synced after every step): the importance weight
    # pi_S / pi_sampler is 1 up to float error, as with HF generate.
    weights = [k for k in vllm[0] if k.endswith("is_weight_mean")]
    assert weights
    for key in weights:
        assert all(abs(record[key] - 1.0) < 1e-3 for record in vllm), key
    # ... and token by token: no sampled token's lOld is far from the trainer's lS.
    gaps = [record["rollout/sampler_gap_max"] for record in vllm + hf]
    assert max(gaps) < 1e-2, gaps
    before = load_file(str(models / "student" / "model.safetensors"))
    after = load_file(str(tmp_path / "vllm" / "run" / "final" / "model.safetensors"))
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_a_lora_student_samples_from_its_merged_weights(models, prompts_file, tmp_path):
    """The engine holds base weights; every sync must merge the trained adapters in, or from the second
    step on the sampler would not be the policy and the importance weight would leave 1."""
    records = train_in_subprocess(models, prompts_file, tmp_path, "vllm",
                                  student={"path": str(models / "student"), "lora": {"rank": 4}},
                                  optim={"lr": 0.05, "micro_batch_size": 2})
    weights = [k for k in records[0] if k.endswith("is_weight_mean")]
    assert weights and len(records) == 3
    assert all(abs(record[key] - 1.0) < 1e-3 for record in records for key in weights), records


@pytest.mark.slow
def test_two_processes_sample_from_their_own_synced_engines(models, prompts_file, tmp_path):
    """`opd train --nproc 2` with rollout.backend: vllm: each rank's engine takes the FSDP2-gathered weights
    after every step, so the importance weight stays 1 on every rank's rows (a stale engine leaves it)."""
    config = make_config(models, prompts_file, tmp_path / "run",
                         rollout={"backend": "vllm", "prompts_per_step": 2, "vllm": {"kv_cache_gib": 0.0625}},
                         objective={"name": "tropd", "tropd": {"advantage": "gopd"}},
                         optim={"lr": 0.05, "micro_batch_size": 2})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    result = subprocess.run([sys.executable, "-m", "opd", "train", str(path), "--nproc", "2"], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    weights = [k for k in records[0] if k.endswith("is_weight_mean")]
    assert weights and len(records) == 3
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float)), records
    assert all(abs(record[key] - 1.0) < 1e-3 for record in records for key in weights), records
