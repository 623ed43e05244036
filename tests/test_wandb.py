"""train.wandb: a tiny real run in W&B's offline mode, read back from the run's own .wandb file."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from conftest import make_config

from opd.checks import StartupError, check_launch
from opd.config_tree import ConfigError
from opd.runtime.monitor import read_metrics
from opd.train import train

wandb = pytest.importorskip("wandb")  # the extra is installed by scripts/setup.sh, so CI runs this
from wandb.proto import wandb_internal_pb2  # noqa: E402

_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) + data
_FILE_HEADER = 7  # ":W&B", a 2-byte magic, a version byte


def _records(path: Path) -> list:
    """Every protobuf Record in a .wandb file (our own reader: wandb ships none that is public)."""
    data, offset, pending, records = path.read_bytes(), _FILE_HEADER, b"", []
    while offset + 7 <= len(data):
        if _BLOCK - offset % _BLOCK < 7:  # a block's tail too short for a header is padding
            offset += _BLOCK - offset % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if length == 0 and kind == 0:
            break
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL or LAST: one record complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("WANDB_DISABLE_STATS", "true")  # no system metrics sampler


def test_offline_run_records_the_config_and_the_metrics_of_metrics_jsonl(model_dir, prompts_file, tmp_path):
    import json

    run_dir = tmp_path / "run"
    config = make_config(model_dir, prompts_file, run_dir,
                         train={"steps": 2, "wandb": {"project": "opd-test", "name": "tiny", "mode": "offline"}})
    train(config)
    [wandb_file] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = _records(wandb_file)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "opd-test" and run.display_name == "tiny"
    logged_config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert logged_config["objective"]["lam"] == 1.25
    assert logged_config["train"]["steps"] == 2
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    by_step = {}
    for entry in history:
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in entry.item}
        by_step[entry.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    expected = {r["step"]: {k: v for k, v in r.items() if k != "step" and v is not None}
                for r in read_metrics(run_dir / "metrics.jsonl")}
    assert sorted(by_step) == [1, 2]
    for step, values in expected.items():
        assert by_step[step] == pytest.approx(values), step


def test_wandb_configured_but_not_installed_is_refused_before_any_compute(model_dir, prompts_file, tmp_path,
                                                                          monkeypatch):
    import importlib.util

    config = make_config(model_dir, prompts_file, tmp_path / "run", train={"wandb": {"project": "p"}})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(StartupError, match=r"pip install 'opd\[wandb\]'"):
        check_launch(config, world_size=1, cuda=False, resume=False, checkpoint=None)


def test_wandb_mode_and_project_are_validated_with_dotted_keys(model_dir, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.wandb\.mode"):
        make_config(model_dir, prompts_file, tmp_path / "run", train={"wandb": {"project": "p", "mode": "cloud"}})
    with pytest.raises(ConfigError, match=r"train\.wandb\.project"):
        make_config(model_dir, prompts_file, tmp_path / "run", train={"wandb": {"project": " "}})
