"""Custom graders: `module:function` or registered names, refused at load when unusable, loud when they fail."""

from __future__ import annotations

import time

import pytest
from conftest import make_config

from opd.config import ConfigError
from opd.data import PromptRow
from opd.grading.custom import GraderError, checked, register_grader, unregister_grader
from opd.runtime.monitor import read_metrics
from opd.train import train

USER_MODULE = '''
def quarter(row, completion):
    return 0.25

def per_domain(row, completion):
    return 1.0 if row.domain == "math" else 0.0

def one_argument(row):
    return 1.0

def broken(row, completion):
    raise KeyError("solution")
'''

ROW = PromptRow(index=4, prompt="p", domain="math", where="data.jsonl:5")


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def graded_config(model_dir, prompts_file, tmp_path, math_grader, code_grader="my_rewards:per_domain"):
    return make_config(model_dir, prompts_file, tmp_path / "run", teachers=[
        {"domain": "math", "path": str(model_dir / "teacher"), "grader": math_grader},
        {"domain": "code", "path": str(model_dir / "teacher_b"), "grader": code_grader}],
        train={"steps": 1, "output_dir": str(tmp_path / "run"), "save_every": 0, "tensorboard": False,
               "progress": False})


def test_module_function_and_registered_graders_give_the_rewards_of_training(model_dir, prompts_file, tmp_path,
                                                                            user_module):
    register_grader("always_one", lambda row, completion: True)
    try:
        train(graded_config(model_dir, prompts_file, tmp_path, "my_rewards:quarter", "always_one"))
    finally:
        unregister_grader("always_one")
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["reward/math/accuracy"] == 0.25 and record["reward/code/accuracy"] == 1.0


@pytest.mark.parametrize("spec, message", [
    ("absent_module:f", "module 'absent_module' could not be imported"),
    ("my_rewards:nothing", "has no 'nothing'"),
    ("my_rewards:one_argument", "must take (row, completion)"),
    ("nonsense", "is not a grader"),
])
def test_an_unusable_grader_is_refused_at_load_naming_the_key(spec, message, model_dir, prompts_file, tmp_path,
                                                              user_module):
    with pytest.raises(ConfigError) as raised:
        graded_config(model_dir, prompts_file, tmp_path, "exact", spec)
    assert "teachers.1.grader" in str(raised.value) and message in str(raised.value)


def test_a_grader_that_raises_stops_the_run_naming_the_row_and_domain(model_dir, prompts_file, tmp_path, user_module):
    with pytest.raises(GraderError, match=r"'my_rewards:broken' raised KeyError.*prompts.jsonl:\d+ \(domain 'math'\)"):
        train(graded_config(model_dir, prompts_file, tmp_path, "my_rewards:broken"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1", None, 1.5, -0.1])
def test_a_return_that_is_not_a_reward_is_an_error(value):
    with pytest.raises(GraderError, match=r"returned .* on data.jsonl:5 \(domain 'math'\)"):
        checked(lambda row, completion: value, "mine")(ROW, "text")


def test_a_grader_past_its_timeout_stops_the_run_naming_the_row():
    with pytest.raises(GraderError, match=r"took more than 0.2 s on data.jsonl:5"):
        checked(lambda row, completion: time.sleep(5), "slow", timeout_seconds=0.2)(ROW, "text")
    assert checked(lambda row, completion: 1, "fast", timeout_seconds=5)(ROW, "text") == 1.0
