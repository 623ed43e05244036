"""Hugging Face hub ids as model paths, read from a local cache only (runtime/hub.py)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from conftest import make_config

from opd.assemble import with_local_model_folders
from opd.evaluate.run import EvalSettings, evaluate
from opd.evaluate.sampling import EvalBackend
from opd.merge import expo_merge
from opd.runtime.hub import local_model_folder
from opd.runtime.models import load_tokenizer
from opd.train import train

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo_id: str, folder: Path) -> Path:
    """The hub cache layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repository = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repository / "snapshots" / REVISION
    shutil.copytree(folder, snapshot)
    (repository / "refs").mkdir(parents=True)
    (repository / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture()
def hub_cache(model_dir, tmp_path, monkeypatch) -> Path:
    """A cache holding org/student, org/teacher and org/base, named by HF_HUB_CACHE; any network access fails."""
    cache = tmp_path / "hf-cache"
    for name in ("student", "teacher", "base"):
        cache_model(cache, f"org/{name}", model_dir / name)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("opd reached for the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache


def test_hub_ids_train_as_student_teacher_and_reference_from_the_cache_alone(model_dir, prompts_file, hub_cache,
                                                                             tmp_path):
    config = make_config(model_dir, prompts_file, tmp_path / "run", student={"path": "org/student"},
                         teachers=[{"domain": "math", "path": "org/teacher", "reference": "org/base"},
                                   {"domain": "code", "path": "org/teacher"}],
                         train={"steps": 1, "output_dir": str(tmp_path / "run"), "save_every": 0,
                                "tensorboard": False, "progress": False})
    local = with_local_model_folders(config)
    snapshot = hub_cache / "models--org--{}" / "snapshots" / REVISION
    assert local.student.path == str(snapshot).format("student")
    assert [t.path for t in local.teachers] == [str(snapshot).format("teacher")] * 2
    assert local.teachers[0].reference == str(snapshot).format("base")
    assert local.teachers[1].reference == "student_init"
    final = train(config)
    assert (final / "config.json").is_file()
    # The run records the ids as written, not the cache's folders.
    assert "org/student" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_hub_id_missing_from_the_cache_names_the_id_and_the_cache(model_dir, prompts_file, hub_cache, tmp_path):
    config = make_config(model_dir, prompts_file, tmp_path / "run", teachers=[
        {"domain": "math", "path": "org/teacher"}, {"domain": "code", "path": "org/absent"}])
    with pytest.raises(FileNotFoundError) as raised:
        with_local_model_folders(config)
    message = str(raised.value)
    assert "teachers.1.path" in message and "'org/absent'" in message and str(hub_cache) in message


def test_hf_home_is_honoured_when_hf_hub_cache_is_unset(model_dir, tmp_path, monkeypatch):
    cache_model(tmp_path / "home" / "hub", "org/student", model_dir / "student")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert load_tokenizer("org/student", key="student.path").get_vocab() == load_tokenizer(
        str(model_dir / "student")).get_vocab()


def test_a_local_folder_named_like_a_hub_id_wins_over_the_cache(model_dir, hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(model_dir / "base", tmp_path / "org" / "student")
    assert local_model_folder("org/student", "student.path") == "org/student"


def test_opd_eval_and_merge_take_cached_hub_ids(model_dir, hub_cache, tmp_path):
    results = evaluate(["arc_challenge"], EvalSettings(limit=1, max_new_tokens=2), str(tmp_path / "eval"),
                       model_dir="org/student", backend=EvalBackend())
    assert results["model"] == str(hub_cache / "models--org--student" / "snapshots" / REVISION)
    assert results["benchmarks"]["arc_challenge"]["answered"] == 1
    merged = expo_merge(["org/teacher"], "org/student", 0.5, str(tmp_path / "merged"))
    assert (merged / "config.json").is_file()
