"""A resume continues the recorded run: every segment's config is kept, changes to what is trained are
refused unless allowed (and then recorded), and a step count below the checkpoint's is refused."""

from __future__ import annotations

import pytest
from conftest import make_config

from opd.checks import StartupError
from opd.config import load_config
from opd.train import train


def test_resume_keeps_every_segments_config_and_refuses_what_would_rewrite_the_record(model_dir, prompts_file,
                                                                                        tmp_path):
    run = tmp_path / "run"
    train(make_config(model_dir, prompts_file, run, train={"steps": 2, "save_every": 2}))
    first = (run / "config.yaml").read_text()

    changed = make_config(model_dir, prompts_file, run, objective={"name": "gopd", "lam": 2.0},
                          optim={"lr": 0.5, "micro_batch_size": 2}, train={"steps": 3, "save_every": 2})
    with pytest.raises(StartupError, match=r"objective.lam, optim.lr differ from .*config.yaml.*--allow-config-change"):
        train(changed, resume=True)
    assert sorted(p.name for p in run.glob("config*")) == ["config.yaml"]  # nothing recorded, nothing trained

    # How the run is carried out (steps, checkpoint cadence, micro-batches) may change without the flag.
    train(make_config(model_dir, prompts_file, run, optim={"lr": 1e-3, "micro_batch_size": 1},
                      train={"steps": 3, "save_every": 3}), resume=True)
    assert (run / "config.yaml").read_text() == first  # the first segment's record is never rewritten
    assert load_config(run / "config.resume-000002.yaml").optim.micro_batch_size == 1

    allowed = make_config(model_dir, prompts_file, run, objective={"name": "gopd", "lam": 2.0},
                          train={"steps": 4, "save_every": 4})
    train(allowed, resume=True, allow_config_change=True)
    assert load_config(run / "config.resume-000003.yaml").objective.lam == 2.0
    assert load_config(run / "config.yaml").objective.lam == 1.25

    final = (run / "final" / "model.safetensors").read_bytes()
    with pytest.raises(StartupError, match=r"train.steps=3 is below the 4 steps the checkpoint"):
        train(make_config(model_dir, prompts_file, run, objective={"name": "gopd", "lam": 2.0},
                          train={"steps": 3, "save_every": 4}), resume=True)
    assert (run / "final" / "model.safetensors").read_bytes() == final  # final/ left as it was
