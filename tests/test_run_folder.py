"""Every write in a run folder survives a kill -9 and a full disk; a run folder holds only what opd wrote.

The kills run `opd train` in a subprocess (run_folder_worker.py) that SIGKILLs itself in the middle of a
write: the final save, a checkpoint's deletion by pruning, the metrics rewrite on resume, a checkpoint's
write. After each, no folder or file under a final name is torn, and resuming gives exactly the weights
and metrics of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_config
from support import parameters_of

from opd.config import to_dict
from opd.runtime.monitor import MetricsLogger, read_metrics
from opd.train import train

WORKER = Path(__file__).parent / "run_folder_worker.py"
STEPS = 4
CHECKPOINT_FILES = ("record.json", "optimizer.pt", "rng_0.pt", "state_0.pt", "model/model.safetensors",
                    "model/config.json", "model/tokenizer.json")


@pytest.fixture(scope="module")
def straight(model_dir, prompts_file, tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps: what every killed-and-resumed run must equal."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(make_config(model_dir, prompts_file, run_dir, train={"steps": STEPS}))
    return run_dir


def run_worker(config, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    path = folder / f"config-{len(list(folder.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    return subprocess.run([sys.executable, str(WORKER), str(path), *extra], capture_output=True, text=True,
                          timeout=600)


def assert_killed(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-3000:])


def assert_same_as_straight(run_dir: Path, straight: Path) -> None:
    a, b = parameters_of(straight / "final"), parameters_of(run_dir / "final")
    assert all(torch.equal(a[name], b[name]) for name in a)
    ours, theirs = read_metrics(run_dir / "metrics.jsonl"), read_metrics(straight / "metrics.jsonl")
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    for mine, other in zip(ours, theirs, strict=True):
        timeless = {k for k in other if not k.startswith("perf/")}
        assert {k: mine[k] for k in timeless} == {k: other[k] for k in timeless}
    leftovers = [p.name for folder in (run_dir, run_dir / "checkpoints") for p in folder.iterdir()
                 if p.name.startswith((".partial-", ".deleting-")) or p.name.endswith(".tmp")]
    assert leftovers == []


def test_kill_during_the_final_save_leaves_no_torn_final_folder(model_dir, prompts_file, tmp_path, straight):
    run_dir = tmp_path / "run"
    config = make_config(model_dir, prompts_file, run_dir, train={"steps": STEPS})
    assert_killed(run_worker(config, tmp_path, "--kill-at", "model-write:final"))
    # The weights were written, the tokenizer not yet: under the final name there is nothing, never half.
    assert not (run_dir / "final").exists(), sorted(p.name for p in (run_dir / "final").iterdir())
    train(config, resume=True)  # resumed in this process: what matters is what the kill left
    assert_same_as_straight(run_dir, straight)


def test_kill_during_pruning_leaves_no_torn_checkpoint(model_dir, prompts_file, tmp_path, straight):
    run_dir = tmp_path / "run"
    config = make_config(model_dir, prompts_file, run_dir,
                         train={"steps": STEPS, "save_every": 1, "keep_checkpoints": 1})
    assert_killed(run_worker(config, tmp_path, "--kill-at", "prune"))  # step 2 saved, step 1 half-deleted
    named = sorted(p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert "step_000002" in [p.name for p in named]
    for folder in named:
        missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
        assert missing == [], f"{folder.name} is torn: no {missing}"
    train(config, resume=True)  # resumed in this process: what matters is what the kill left
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000004"]
    assert_same_as_straight(run_dir, straight)


def test_kill_during_the_metrics_rewrite_loses_no_record(model_dir, prompts_file, tmp_path, straight):
    run_dir = tmp_path / "run"
    config = make_config(model_dir, prompts_file, run_dir, train={"steps": STEPS, "save_every": 2})
    # Killed while writing step 4's checkpoint (weights written, the rest not): steps 1-4 are logged,
    # step 2 is the newest complete checkpoint.
    assert_killed(run_worker(config, tmp_path, "--kill-at", "model-write:step_000004"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_000002"]
    logged = (run_dir / "metrics.jsonl").read_text()
    # The resume cuts steps 3-4 from the log and is killed halfway through writing the cut file.
    assert_killed(run_worker(config, tmp_path, "--resume", "--kill-at", "metrics-rewrite"))
    assert (run_dir / "metrics.jsonl").read_text() == logged
    train(config, resume=True)  # resumed in this process: what matters is what the kill left
    assert_same_as_straight(run_dir, straight)


def test_a_torn_last_metrics_line_is_dropped_on_resume_with_a_note(model_dir, prompts_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(make_config(model_dir, prompts_file, run_dir, train={"steps": 2, "save_every": 2}))
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "loss": 0.1')  # a kill in the middle of logging step 3
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    train(make_config(model_dir, prompts_file, run_dir, train={"steps": 3, "save_every": 2}), resume=True)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert "dropped a torn last line" in capsys.readouterr().err


def test_an_unreadable_metrics_line_before_the_last_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": 1}), '{"step": 2, "lo', json.dumps({"step": 3})]
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a metrics record"):
        MetricsLogger(tmp_path, total_steps=3, start_step=1, tensorboard=False, progress=False)
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2"):
        read_metrics(path)
    assert path.read_text() == "".join(line + "\n" for line in lines)  # left as it was


def test_a_complete_unterminated_last_line_is_kept_and_terminated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}))
    logger = MetricsLogger(tmp_path, total_steps=3, start_step=2, tensorboard=False, progress=False)
    logger.log(3, {"loss": 0.5})
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_non_finite_weights_are_never_checkpointed(model_dir, prompts_file, tmp_path, monkeypatch):
    """A finite gradient with too large a step can still make the weights non-finite: nothing is saved."""
    import opd.train as train_module

    original = train_module.apply_update

    def poisoning(state, max_grad_norm):
        metrics = original(state, max_grad_norm)
        with torch.no_grad():
            next(state.student.parameters()).view(-1)[0] = float("inf")
        return metrics

    monkeypatch.setattr(train_module, "apply_update", poisoning)
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"step 1: the student's weights hold 1 non-finite values"):
        train(make_config(model_dir, prompts_file, run_dir, train={"steps": 2, "save_every": 1}))
    assert not (run_dir / "checkpoints").exists() or list((run_dir / "checkpoints").iterdir()) == []
    assert not (run_dir / "final").exists()


def test_an_output_folder_with_foreign_files_is_refused_and_left_alone(model_dir, prompts_file, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    config = make_config(model_dir, prompts_file, run_dir, train={"steps": 1})
    with pytest.raises(OSError, match=r"holds files opd did not write \(data, notes.txt\)"):
        train(config)
    assert sorted(p.name for p in run_dir.iterdir()) == ["data", "notes.txt"]
    assert (run_dir / "notes.txt").read_text() == "mine"
    # An empty folder is fine, and so is a first segment that crashed before its first checkpoint: it
    # holds only opd's own files and nothing to resume, so the run starts over.
    (run_dir / "notes.txt").unlink()
    (run_dir / "data").rmdir()
    (run_dir / "config.yaml").write_text("stale: true\n")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    train(config)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1]
    assert read_metrics(run_dir / "metrics.jsonl")[0]["loss"] != 9.0


def test_an_output_path_that_is_a_file_is_refused(model_dir, prompts_file, tmp_path):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(OSError, match="is a file, not a folder"):
        train(make_config(model_dir, prompts_file, tmp_path / "run", train={"steps": 1}))


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A tmpfs of `size` mounted at folder: a disk that fills up for real."""
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """Room for config.yaml and a step's metrics, not for a checkpoint."""
    with tmpfs(tmp_path / "disk", "96k") as folder:
        yield folder


def test_a_full_disk_while_logging_names_the_metrics_file_and_the_step(tmp_path):
    with tmpfs(tmp_path / "disk", "4k") as folder:
        logger = MetricsLogger(folder, total_steps=3, start_step=0, tensorboard=False, progress=False)
        with pytest.raises(OSError, match=re.escape(f"{folder / 'metrics.jsonl'}: no space left on the device "
                                                    "while writing it at step 1")):
            logger.log(1, {f"figure/{index}": 0.5 for index in range(1000)})  # a line longer than the disk
        with contextlib.suppress(OSError):
            logger.close()


def test_a_full_disk_names_the_folder_and_the_step_and_removes_the_partial_checkpoint(
        model_dir, prompts_file, tmp_path, small_disk):
    from opd.cli import main

    run_dir = small_disk / "run"
    config = make_config(model_dir, prompts_file, run_dir, train={"steps": 2, "save_every": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(path)])
    message = str(exit_info.value.code)
    assert message.startswith("opd: ") and "no space left on the device" in message, message
    assert f"{run_dir / 'checkpoints' / 'step_000001'}" in message and "at step 1" in message, message
    assert list((run_dir / "checkpoints").iterdir()) == []  # the partial folder is gone
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1]


def test_a_full_disk_during_the_final_save_names_it_and_removes_the_partial_folder(
        model_dir, prompts_file, tmp_path, monkeypatch):
    import transformers.modeling_utils

    original = transformers.modeling_utils.safe_save_file

    def full_disk_for_final(tensors, filename, *args, **kwargs):
        if "final" in Path(filename).parent.name:
            Path(filename).write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk_for_final)
    run_dir = tmp_path / "run"
    expected = f"{run_dir / 'final'}: no space left on the device while writing it at step 2; the partial .partial-final was removed"
    with pytest.raises(OSError, match=re.escape(expected)):
        train(make_config(model_dir, prompts_file, run_dir, train={"steps": 2}))
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]


def test_an_evaluation_cache_with_a_torn_last_line_resumes(model_dir, tmp_path):
    """`opd eval` appends one line per sample to its cache: a kill mid-append must not break the next run."""
    from opd.evaluate.benchmarks import load_benchmark
    from opd.evaluate.run import EvalSettings, generate_completions
    from opd.evaluate.sampling import EvalBackend

    problems = load_benchmark("arc_challenge")[:2]
    settings = EvalSettings(samples=1, max_new_tokens=4, limit=2)
    first = generate_completions(str(model_dir / "student"), problems, settings, tmp_path / "cache", EvalBackend())
    [cache] = (tmp_path / "cache").glob("*.jsonl")
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # the second sample's line torn
    again = generate_completions(str(model_dir / "student"), problems, settings, tmp_path / "cache", EvalBackend())
    assert again[problems[0].problem_id] == first[problems[0].problem_id]  # from the cache
    assert len(again[problems[1].problem_id]) == 1  # sampled again
    text = cache.read_text()
    assert text.endswith("\n") and [json.loads(line)["problem_id"] for line in text.splitlines()] == \
        [problems[0].problem_id, problems[1].problem_id]


@pytest.mark.slow
def test_kills_at_random_moments_always_resume_to_the_uninterrupted_run(model_dir, prompts_file, tmp_path, straight):
    """kill -9 at seeded random moments (start-up, steps, checkpoint writes, pruning, the final save),
    resuming after each, until a segment finishes: the result is bit-identical to the uninterrupted run."""
    import random

    run_dir = tmp_path / "run"
    config = make_config(model_dir, prompts_file, run_dir,
                         train={"steps": STEPS, "save_every": 1, "keep_checkpoints": 1})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    chance = random.Random(0)
    kills = 0
    for _ in range(12):
        log = tmp_path / "worker.log"
        with log.open("w") as output:
            worker = subprocess.Popen([sys.executable, str(WORKER), str(path), "--resume"],
                                      stdout=output, stderr=subprocess.STDOUT)
        try:
            worker.wait(timeout=chance.uniform(4.0, 20.0))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            kills += 1
            continue
        assert worker.returncode == 0, log.read_text()[-3000:]
        break
    else:
        pytest.fail("no segment finished")
    assert kills, "no kill landed: the delays are too long for this machine"
    assert_same_as_straight(run_dir, straight)
