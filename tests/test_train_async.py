"""`rollout.async` end to end against real vLLM servers (tests/served_support.py): a run with max_staleness 1
trains on batches one step stale and logs it; max_staleness 0 trains the same weights as the synchronous
step, bit for bit; a resumed run samples the batches that were in flight again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_config
from safetensors.torch import load_file

from opd.train import train

pytest.importorskip("vllm")

STEPS = 3


def served_run(models: Path, prompts_file: Path, folder: Path, servers: dict, *, steps: int = STEPS,
               resume: bool = False, **rollout) -> Path:
    config = make_config(
        models, prompts_file, folder, data={"path": str(prompts_file), "max_prompt_tokens": 200},
        rollout={"max_new_tokens": 8, "backend": "vllm-server",
                 "server": {"urls": [servers["student"]], "sync": "folder",
                            "sync_folder": str(folder.parent / f"{folder.name}_sync")}, **rollout},
        objective={"name": "gopd", "lam": 1.25, "score_temperature": 1.0},
        teachers=[{"domain": domain, "path": str(models / "teacher"), "backend": "vllm-server",
                   "server": {"urls": [servers["teacher"]]}} for domain in ("math", "code")],
        optim={"lr": 1e-2, "micro_batch_size": 2},
        train={"steps": steps, "output_dir": str(folder), "save_every": 1, "tensorboard": False, "progress": False},
    )
    return train(config, resume=resume)


@pytest.fixture(scope="module")
def runs(servers, served_models, prompts_file, tmp_path_factory) -> dict[str, Path]:
    """The same run three ways, one after the other on the shared servers: synchronous, async K=0, async K=1."""
    root = tmp_path_factory.mktemp("async_runs")
    return {
        "sync": served_run(served_models, prompts_file, root / "sync", servers),
        "k0": served_run(served_models, prompts_file, root / "k0", servers, **{"async": True, "max_staleness": 0}),
        "k1": served_run(served_models, prompts_file, root / "k1", servers, **{"async": True, "max_staleness": 1}),
    }


def weights(final: Path) -> dict[str, torch.Tensor]:
    return load_file(str(final / "model.safetensors"))


def records(final: Path) -> list[dict]:
    return [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]


def test_max_staleness_0_trains_the_same_weights_as_the_synchronous_step(runs, served_models):
    synchronous, pipelined = weights(runs["sync"]), weights(runs["k0"])
    assert synchronous.keys() == pipelined.keys()
    assert all(torch.equal(synchronous[name], pipelined[name]) for name in synchronous)
    initial = load_file(str(served_models / "student" / "model.safetensors"))
    assert any(not torch.equal(initial[name], synchronous[name]) for name in initial)  # it trained
    assert [r["async/staleness_max"] for r in records(runs["k0"])] == [0.0] * STEPS


def test_max_staleness_1_trains_on_batches_one_step_stale_and_logs_it(runs):
    lines = records(runs["k1"])
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert len({frozenset(line) for line in lines}) == 1  # the same keys on every line
    # The schedule: batch s sampled with the weights of step max(0, s - 2), trained at step s - 1.
    assert [line["async/staleness_max"] for line in lines] == [0.0, 1.0, 1.0]
    assert [line["async/staleness_mean"] for line in lines] == [0.0, 1.0, 1.0]
    for line in lines:
        assert 0.0 <= line["perf/engine_busy_fraction"] <= 1.0
        assert line["perf/trainer_wait_seconds"] >= 0.0 and line["perf/generation_wait_seconds"] >= 0.0
        assert line["gopd/is_weight_max"] >= line["gopd/is_weight_mean"] > 0.0
        assert 0.0 <= line["gopd/is_truncated_fraction"] <= 1.0
    # A stale sampler is not the student: its IS weights move away from 1 (the synchronous run's stay at 1).
    assert max(abs(line["gopd/is_weight_max"] - 1.0) for line in lines[1:]) > 1e-3
    assert all(abs(line["gopd/is_weight_max"] - 1.0) < 1e-3 for line in records(runs["sync"]))
    synchronous, stale = weights(runs["sync"]), weights(runs["k1"])
    assert any(not torch.equal(synchronous[name], stale[name]) for name in synchronous)


def test_a_resumed_async_run_regenerates_the_batches_in_flight_from_the_checkpoint(servers, served_models,
                                                                                    prompts_file, tmp_path):
    folder = tmp_path / "run"
    pipelined = {"async": True, "max_staleness": 1}
    served_run(served_models, prompts_file, folder, servers, steps=2, **pipelined)
    final = served_run(served_models, prompts_file, folder, servers, steps=3, resume=True, **pipelined)
    lines = records(final)
    assert [line["step"] for line in lines] == [1, 2, 3]
    # Step 3's batch, in flight when the first segment ended, was sampled again from step 2's checkpoint.
    assert [line["async/staleness_max"] for line in lines] == [0.0, 1.0, 0.0]
