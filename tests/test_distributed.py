"""Data parallelism with FSDP2 on 2 CPU processes (gloo): the same global batch on 1 and 2 processes gives
the same weights, and `opd train --nproc 2` trains, checkpoints and resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_config

from opd.assemble import assemble, seed_everything
from opd.config import to_dict
from opd.runtime.monitor import read_metrics
from opd.collect import collect
from opd.teachers import score_batch

WORKER = Path(__file__).with_name("distributed_worker.py")


def torchrun(*args, nproc=2, cwd=None):
    # The workers import the tests' helpers; a PYTHONPATH already set (a source tree to test) is kept after them.
    search_path = os.pathsep.join(p for p in (str(WORKER.parent), os.environ.get("PYTHONPATH")) if p)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": search_path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, cwd=cwd)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_one_and_two_processes_give_the_same_weights(model_dir, prompts_file, tmp_path, aggregation):
    config = make_config(model_dir, prompts_file, tmp_path / "run", rollout={"prompts_per_step": 4},
                         objective={"name": "gopd", "lam": 1.25, "aggregation": aggregation},
                         optim={"lr": 1e-2, "micro_batch_size": 2, "max_grad_norm": 0.5})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(config)))
    seed_everything(0)
    run = assemble(config)
    batches = []
    for step, indices in enumerate(([0, 1, 2, 3], [4, 5, 0, 2])):
        batch = collect(run, step, indices, {})
        import dataclasses

        lengths = torch.tensor([8, 3, 5, 1, 8, 6, 2, 7])  # unequal lengths across the two ranks' shares
        batch = dataclasses.replace(batch, response_mask=torch.arange(8)[None, :] < lengths[:, None])
        batches.append((batch, score_batch(batch, run.scorers, run.scoring)))
    batches_path = tmp_path / "batches.pt"
    torch.save(batches, batches_path)
    single = subprocess.run([sys.executable, str(WORKER), str(config_path), str(batches_path), str(tmp_path / "one.pt")],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    double = torchrun(str(WORKER), str(config_path), str(batches_path), str(tmp_path / "two.pt"))
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    # The gradient norm is scale-sensitive (Adam's update is not): it catches a mean-instead-of-sum reduction.
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-4)
    initial = dict(run.student.state_dict())
    moved = 0
    for name, value in one["state"].items():
        # Adam divides by sqrt(v): near-zero gradients turn summation-order noise into ~1e-5 (lr is 1e-2).
        torch.testing.assert_close(two["state"][name], value, rtol=1e-4, atol=5e-5)
        moved += not torch.equal(value, initial[name])
    assert moved > 0


def test_opd_train_nproc_2_trains_checkpoints_and_resumes(model_dir, prompts_file, tmp_path):
    # The math teacher is sharded, the code teacher replicated: both paths run inside training.
    config = make_config(model_dir, prompts_file, tmp_path / "run", rollout={"prompts_per_step": 4},
                         teachers=[{"domain": "math", "path": str(model_dir / "teacher"), "shard": True},
                                   {"domain": "code", "path": str(model_dir / "teacher_b")}],
                         train={"steps": 2, "save_every": 1})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(config)))
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-m", "opd", "train", str(config_path), "--nproc", "2"],
                           capture_output=True, text=True, env=environment, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([sys.executable, "-m", "opd", "train", str(config_path), "train.steps=3", "--nproc", "2",
                             "--resume"], capture_output=True, text=True, env=environment, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["rollout/tokens"] > 0 for r in records)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000003"
    assert (checkpoint / "rng_0.pt").is_file() and (checkpoint / "rng_1.pt").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "final"))


def test_sharded_teachers_score_like_replicated_ones(model_dir, prompts_file, tmp_path):

    config = make_config(model_dir, prompts_file, tmp_path / "run", rollout={"prompts_per_step": 4},
                         objective={"name": "tropd", "tropd": {"advantage": "gopd"}, "lam": 1.25, "topk": 4},
                         teachers=[{"domain": "math", "path": str(model_dir / "teacher"), "shard": True},
                                   {"domain": "code", "path": str(model_dir / "teacher_b"), "shard": True}],
                         optim={"micro_batch_size": 2})
    seed_everything(0)
    run = assemble(config)  # one process: shard is a no-op, the models are whole
    indices = [0, 2, 1, 4]  # rank 0 gets only math rows, rank 1 code then math: unequal forward counts
    batch = collect(run, 0, indices, {})
    assert batch.domain == ("math",) * 4 + ("code", "code", "math", "math")
    expected = score_batch(batch, run.scorers, run.scoring)
    config_path, batch_path = tmp_path / "config.yaml", tmp_path / "batch.pt"
    config_path.write_text(yaml.safe_dump(to_dict(config)))
    torch.save(batch, batch_path)
    result = torchrun(str(WORKER.with_name("distributed_scoring_worker.py")), str(config_path), str(batch_path),
                      str(tmp_path / "scores.pt"))
    assert result.returncode == 0, result.stderr[-3000:]
    logprobs, ref_logprobs, topk_ids = torch.load(tmp_path / "scores.pt")
    torch.testing.assert_close(logprobs, expected.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_logprobs, expected.ref_logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(topk_ids, expected.topk_ids)


@pytest.mark.parametrize("succeeded", [True, False])
def test_finish_leaves_the_process_group(tmp_path, succeeded):
    # A rank that exits with gloo's threads alive can abort (`terminate called without an active exception`)
    # after its work is done; `opd train` therefore leaves the group before the interpreter tears down.
    import torch.distributed as dist

    from opd.runtime import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert distributed.is_distributed()
    distributed.finish(succeeded)
    assert not dist.is_initialized()
    distributed.finish(succeeded)  # a second call, or one without a group, is a no-op
