"""The command line: `opd train` end to end in a subprocess, config errors, example configs, the demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
    resumed = run_cli("train", str(path), "train.steps=3", "objective.lam=1.5", "--resume")  # the same lam
    assert resumed.returncode == 0, resumed.stderr


def test_python_m_opd_cli_reaches_every_command():
    """`python -m opd.cli` runs main() only after every function it dispatches to is defined."""
    result = subprocess.run([sys.executable, "-m", "opd.cli", "eval", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-m", "opd.cli", "eval", "--responses", "missing.jsonl"],
                            capture_output=True, text=True)
    assert "--benchmark NAME" in result.stderr, result.stderr


def test_every_command_is_reachable_and_bench_help_names_every_step_variant():
    """The parser knows every command run_command dispatches to, and `opd bench --help` lists every variant
    `opd bench step --variants` accepts (the help is written out: importing the benchmarks would import torch)."""
    from opd.bench.step import ALL_VARIANTS
    from opd.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"train", "lab", "demo", "merge", "eval", "serve", "report", "bench"}
    variants_help = next(action.help for action in commands["bench"]._actions if "--variants" in action.option_strings)
    listed = variants_help.split("default: all of ", 1)[1].split(")", 1)[0]
    assert [name.strip() for name in listed.split(",")] == list(ALL_VARIANTS)


def test_opd_train_reports_a_bad_config_and_exits_nonzero(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("student: {path: s}\nteachers: [{domain: d, path: t}]\ndata: {path: x.jsonl}\noptim: {lr: fast}\n")
    result = run_cli("train", str(path))
    assert result.returncode != 0
    assert "bad.yaml: optim.lr: expected a number, got 'fast'" in result.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    load_config(path)  # the load is the test: it validates every field and raises on a bad one


def test_demo_distils_the_carry_into_the_student_and_says_what_it_does(tmp_path, capsys):
    from opd.lab.demo import QUICK_DEMO, evaluation_sets, exact_match, run_demo, teacher_kl

    root = tmp_path / "demo"
    final = run_demo(str(root), scale=QUICK_DEMO)["opd"]
    printed = capsys.readouterr().out
    # Progress while it builds the models and while it distils, then the table.
    for line in ("opd demo: base on sums that mostly drop the carry: step 50/", "opd demo: teacher = base",
                 "opd train: step 5/", "student after opd"):
        assert line in printed, printed
    first, last = teacher_kl(root / "opd")
    assert last < 0.5 * first, (first, last)  # the student moved toward its teacher
    carry = evaluation_sets()["sums with a carry"]
    before, after = exact_match(root / "models" / "base", carry), exact_match(final, carry)
    assert after > before + 0.3, (before, after)  # ... and took over what the teacher knows that it did not


def test_opd_merge_expo_extrapolates_weights(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = run_cli("merge", "--expo", "--alpha", "0.5", "--teachers", str(model_dir / "teacher"),
                     str(model_dir / "teacher_b"), "--student", str(model_dir / "student"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    load = lambda p: dict(AutoModelForCausalLM.from_pretrained(str(p)).named_parameters())  # noqa: E731
    merged, student = load(out), load(model_dir / "student")
    first, second = load(model_dir / "teacher"), load(model_dir / "teacher_b")
    for name, value in merged.items():
        mean = (first[name] + second[name]) / 2
        torch.testing.assert_close(value, mean + 0.5 * (mean - student[name]))
    assert (out / "tokenizer.json").is_file()


def test_opd_merge_refuses_mismatched_architectures(model_dir, tmp_path):
    from opd.runtime.tiny import build_model, build_tokenizer

    other = tmp_path / "wide"
    build_model(other, build_tokenizer(other), hidden_size=48)
    result = run_cli("merge", "--expo", "--alpha", "0.25", "--teachers", str(other), "--student",
                     str(model_dir / "student"), "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and "has shape" in result.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_train_one_step_on_tiny_models(path, model_dir, tmp_path, monkeypatch):
    """Each example, with its model and data paths pointed at tiny local stand-ins, trains a step."""
    import json

    from opd.grading import graders
    from opd.train import train

    monkeypatch.setitem(graders.GRADERS, "math", lambda row, completion: float(len(completion) % 2 == 0))
    data = yaml.safe_load(path.read_text())
    rows = tmp_path / "rows.jsonl"
    domains = [t["domain"] for t in data["teachers"]]
    rows.write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?", "domain": domains[i % len(domains)],
                                        "answer": str(2 * i), "response": f"{i} + {i} = {2 * i}"}) + "\n"
                            for i in range(4)))
    data["student"] = {"path": str(model_dir / "student")}
    for teacher in data["teachers"]:
        teacher["dtype"] = "float32"
        if teacher.get("path") is not None:
            teacher["path"] = str(model_dir / "teacher")
        if teacher.get("reference") not in (None, "student_init"):
            teacher["reference"] = str(model_dir / "base")
    data["data"] = {**data["data"], "path": str(rows)}
    data["rollout"] = {**data["rollout"], "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6,
                       "batch_size": 4}
    data["optim"] = {**data["optim"], "micro_batch_size": 2}
    data["train"] = {**data["train"], "steps": 1, "output_dir": str(tmp_path / "run"), "tensorboard": False,
                     "progress": False}
    final = train(load_config(base=data))
    assert (final / "config.json").is_file()


def _single_opd_line(result) -> str:
    """A refused run prints exactly one `opd: ...` line (no traceback) and exits non-zero."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("opd: "), result.stderr
    return lines[0]


def test_opd_train_refuses_silently_wrong_configs_with_one_line(model_dir, prompts_file, tmp_path):
    config = make_config(model_dir, prompts_file, tmp_path / "run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    line = _single_opd_line(run_cli("train", str(path), "optim.lr=inf"))
    assert line == f"opd: {path}: optim.lr: must be finite, got inf"
    line = _single_opd_line(run_cli("train", str(path), "objective.tropd.clip_floor=nan"))
    assert line == f"opd: {path}: objective.tropd.clip_floor: must be finite, got nan"
    twice = tmp_path / "twice.yaml"
    twice.write_text(path.read_text() + "train: {steps: 1}\n")
    assert "appears twice in one mapping" in _single_opd_line(run_cli("train", str(twice)))
    assert not (tmp_path / "run").exists()  # nothing ran


def test_opd_train_names_the_data_line_that_is_not_utf8(model_dir, prompts_file, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_bytes(prompts_file.read_bytes() + b'{"prompt": "caf\xe9", "domain": "math"}\n')
    config = make_config(model_dir, data, tmp_path / "run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    line = _single_opd_line(run_cli("train", str(path)))
    assert line.startswith(f"opd: {data}:7: not UTF-8 text"), line


def test_opd_train_exits_nonzero_when_every_step_was_skipped(model_dir, prompts_file, tmp_path, monkeypatch):
    import opd.train as train_module
    from opd.cli import main

    original = train_module.accumulate_gradients

    def poisoned(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        next(model.parameters()).grad.fill_(float("nan"))
        return result

    monkeypatch.setattr(train_module, "accumulate_gradients", poisoned)
    config = make_config(model_dir, prompts_file, tmp_path / "run", train={"steps": 2})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path)])
    assert str(exit_.value.code).startswith("opd: every one of the 2 step(s) of this run was skipped")


def test_dotted_overrides_may_stand_after_flags():
    from opd.cli import parse_arguments

    args = parse_arguments(["train", "cfg.yaml", "objective.lam=2", "--nproc", "2", "train.steps=3", "--resume"])
    assert (args.config, args.nproc, args.resume) == ("cfg.yaml", 2, True)
    assert args.overrides == ["objective.lam=2", "train.steps=3"]  # in the order given
    with pytest.raises(SystemExit):
        parse_arguments(["train", "cfg.yaml", "--nproc", "2", "--no-such-flag"])  # still refused


def test_opd_merge_refuses_an_existing_out_unless_overwrite(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    common = ["merge", "--expo", "--alpha", "0.5", "--teachers", str(model_dir / "teacher"), "--student",
              str(model_dir / "student"), "--out", str(out)]
    line = _single_opd_line(run_cli(*common))
    assert "already exists; pass --overwrite" in line and (out / "notes.txt").read_text() == "mine"
    result = run_cli(*common, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "notes.txt").exists()  # replaced as a whole, not written into
    merged = dict(AutoModelForCausalLM.from_pretrained(str(out)).named_parameters())
    teacher = dict(AutoModelForCausalLM.from_pretrained(str(model_dir / "teacher")).named_parameters())
    student = dict(AutoModelForCausalLM.from_pretrained(str(model_dir / "student")).named_parameters())
    name = next(iter(merged))
    torch.testing.assert_close(merged[name], teacher[name] + 0.5 * (teacher[name] - student[name]))


def test_nproc_batch_size_is_refused_before_any_process_starts(model_dir, prompts_file, tmp_path, monkeypatch):
    import opd.runtime.distributed as distributed
    from opd.cli import main

    def no_launch(*args, **kwargs):
        raise AssertionError("torchrun was launched")

    monkeypatch.setattr(distributed, "launch_local", no_launch)
    config = make_config(model_dir, prompts_file, tmp_path / "run", rollout={"prompts_per_step": 3})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path), "--nproc", "2"])
    assert exit_.value.code == "opd: rollout.prompts_per_step=3 must divide evenly over 2 processes"


def test_a_user_error_inside_torchrun_workers_is_one_opd_line(model_dir, tmp_path):
    """Every rank fails the same way; the user sees the message once, no traceback, no torchrun report."""
    config = make_config(model_dir, tmp_path / "missing.jsonl", tmp_path / "run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    result = subprocess.run([sys.executable, "-m", "opd", "train", str(path), "--nproc", "2"], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = _single_opd_line(result)
    assert line == f"opd: data.path: '{tmp_path / 'missing.jsonl'}' is not a file", result.stderr


@pytest.mark.parametrize("raised, shown", [
    ("opd eval --server http://127.0.0.1:1: the server serves a/, not b/", "opd: eval --server http://127.0.0.1:1: "
                                                                            "the server serves a/, not b/"),
    ("eval: --samples must be >= 1", "opd: eval: --samples must be >= 1"),
    ("student.path: not a folder", "opd: student.path: not a folder"),
])
def test_a_user_error_is_one_line_with_one_opd_prefix(raised, shown, monkeypatch):
    from opd.cli import report_user_error

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        report_user_error(ValueError(raised))
    assert exit_info.value.code == shown
