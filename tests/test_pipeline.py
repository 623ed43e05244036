"""The step's plumbing: the sampler chosen once and synced after every step, refusals before any loading,
and a Run that carries every setting the step reads."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import make_config

import opd.assemble
from opd.assemble import assemble, seed_everything
from opd.checks import StartupError
from opd.config import Config
from opd.rollout.hf import HfSampler
from opd.train import TrainState, build_optimizer, run_one_step, train


class RecordingSampler(HfSampler):
    """The HF sampler, recording what it was asked to do."""

    events: list[tuple[str, object]] = []

    def sample(self, prompts, settings, prefixes=None):
        RecordingSampler.events.append(("sample", len(prompts)))
        return super().sample(prompts, settings, prefixes)

    def sync(self, model):
        RecordingSampler.events.append(("sync", model))


def test_the_loop_syncs_the_factory_built_sampler_before_the_first_step_and_after_every_step(
        model_dir, prompts_file, tmp_path, monkeypatch):
    RecordingSampler.events = []
    monkeypatch.setitem(opd.assemble.SAMPLERS, "hf", lambda config, student, tokenizer: RecordingSampler(student))
    train(make_config(model_dir, prompts_file, tmp_path / "run", train={"steps": 2}))
    kinds = [kind for kind, _ in RecordingSampler.events]
    assert kinds == ["sync", "sample", "sync", "sample", "sync"]
    synced = {id(model) for kind, model in RecordingSampler.events if kind == "sync"}
    assert len(synced) == 1  # always the training model


@pytest.mark.parametrize("refused", [
    ({"train": {"mixed_precision": "bf16"}}, "bf16 autocasts on a GPU"),
    ({"rollout": {"prompts_per_step": 3}}, None),  # divides over one process: accepted, loads models
])
def test_launch_refusals_come_before_any_model_is_loaded(model_dir, prompts_file, tmp_path, monkeypatch, refused):
    sections, message = refused
    loaded = []

    def no_loading(*args, **kwargs):
        loaded.append(args)
        raise RuntimeError("a model was loaded")

    monkeypatch.setattr(opd.assemble, "load_model", no_loading)
    config = make_config(model_dir, prompts_file, tmp_path / "run", **sections)
    if message is None:
        with pytest.raises(RuntimeError, match="a model was loaded"):
            train(config)
        assert loaded  # the guard itself works: an accepted config does reach the loading
    else:
        with pytest.raises(StartupError, match=message):
            train(config)
        assert loaded == []


def test_a_step_needs_only_the_run_and_the_train_state(model_dir, prompts_file, tmp_path):
    config = make_config(model_dir, prompts_file, tmp_path / "run")
    seed_everything(0)
    run = assemble(config)
    assert not any(isinstance(getattr(run, item.name), Config) for item in dataclasses.fields(run))
    state = TrainState(student=run.student, optimizer=build_optimizer(run.student, config.optim))
    values = run_one_step(run, state)
    assert state.step == 1 and values["rollout/tokens"] > 0
