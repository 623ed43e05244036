"""`opd train` with served rollouts and served teachers end to end, against real vLLM servers
(tests/served_support.py): two FSDP2 processes sharing the servers, and a teacher server that goes down
mid-run (the run stops naming the URL and the step; `--resume` completes it)."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_config
from safetensors.torch import load_file

from opd.config import to_dict

pytest.importorskip("vllm")


def write_config(models: Path, prompts_file: Path, folder: Path, *, rollout: dict, teacher: dict, **sections) -> Path:
    config = make_config(
        models, prompts_file, folder / "run", rollout={"max_new_tokens": 8, **rollout},
        data={"path": str(prompts_file), "max_prompt_tokens": 200},
        # ExOPD with top-k forward KL added: lT, top-k and a reference (student_init, in process) all used.
        objective={"name": "gopd", "lam": 1.25, "score_temperature": 1.0, "topk": 4,
                   "add": [{"name": "fkl_topk", "weight": 0.5}]},
        teachers=[{"domain": domain, "path": str(models / "teacher"), **teacher} for domain in ("math", "code")],
        **sections,
    )
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    return path


def opd_train(path: Path, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "opd", "train", str(path), *arguments], capture_output=True,
                            text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]


def test_two_fsdp_processes_train_with_served_rollouts_and_a_served_teacher(servers, served_models, prompts_file,
                                                                           tmp_path):
    hf_folder, served_folder = tmp_path / "hf", tmp_path / "served"
    hf_folder.mkdir(), served_folder.mkdir()
    opd_train(write_config(served_models, prompts_file, hf_folder, rollout={}, teacher={}), "--nproc", "2")
    served = write_config(served_models, prompts_file, served_folder,
                          rollout={"backend": "vllm-server",
                                   "server": {"urls": [servers["student"]], "sync": "folder"}},
                          teacher={"backend": "vllm-server", "server": {"urls": [servers["teacher"]]}})
    opd_train(served, "--nproc", "2")
    hf, vllm = records(hf_folder), records(served_folder)
    assert len(vllm) == len(hf) == 3
    assert [set(record) for record in vllm] == [set(record) for record in hf]
    for record in vllm:
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float)), record
        # The same teacher scores both runs: its KL to the student is of the same size.
        assert 0.2 < record["teacher/kl_k1"] / hf[0]["teacher/kl_k1"] < 5, (record, hf[0])
    # After every sync the servers sample from the current policy: pi_S / pi_sampler = 1, on both ranks'
    # rows (the weight is a mean over the step's rows of both processes).
    weights = [key for key in vllm[0] if key.endswith("is_weight_mean")]
    assert weights
    assert all(abs(record[key] - 1.0) < 1e-3 for record in vllm for key in weights), vllm
    before = load_file(str(served_models / "student" / "model.safetensors"))
    after = load_file(str(served_folder / "run" / "final" / "model.safetensors"))
    assert any(not torch.equal(before[name], after[name]) for name in before)


@pytest.mark.slow  # two training processes against the shared servers (minutes)
def test_two_processes_train_async_with_staleness_1(servers, served_models, prompts_file, tmp_path):
    served = {"backend": "vllm-server", "server": {"urls": [servers["teacher"]]}}
    config = make_config(
        served_models, prompts_file, tmp_path / "run", data={"path": str(prompts_file), "max_prompt_tokens": 200},
        rollout={"max_new_tokens": 8, "backend": "vllm-server", "async": True, "max_staleness": 1,
                 "server": {"urls": [servers["student"]], "sync": "folder"}},
        # Every model served, as async on more than one process needs (lam 1: no reference).
        objective={"name": "gopd", "lam": 1.0, "score_temperature": 1.0},
        teachers=[{"domain": domain, "path": str(served_models / "teacher"), "reference": None, **served}
                  for domain in ("math", "code")],
        optim={"lr": 1e-2, "micro_batch_size": 2},
        train={"steps": 3, "output_dir": str(tmp_path / "run"), "save_every": 0, "tensorboard": False,
               "progress": False},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    opd_train(path, "--nproc", "2")
    lines = records(tmp_path)
    assert [line["step"] for line in lines] == [1, 2, 3]
    # The schedule on both processes (the staleness is reduced over them): batch s sampled with the
    # weights of step max(0, s - 2), trained at step s - 1.
    assert [line["async/staleness_max"] for line in lines] == [0.0, 1.0, 1.0]
    assert [line["async/staleness_mean"] for line in lines] == [0.0, 1.0, 1.0]
    for line in lines:
        assert all(math.isfinite(v) for v in line.values() if isinstance(v, float)), line
        assert 0.0 <= line["perf/engine_busy_fraction"] <= 1.0
    # The first batch was sampled by the current weights; the stale ones' IS weights move away from 1.
    assert abs(lines[0]["gopd/is_weight_max"] - 1.0) < 1e-3
    assert max(abs(line["gopd/is_weight_max"] - 1.0) for line in lines[1:]) > 1e-3
    before = load_file(str(served_models / "student" / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert any(not torch.equal(before[name], after[name]) for name in before)


class Proxy:
    """A TCP forwarder on 127.0.0.1 in front of a server: `close` takes the address down (connections refused),
    as a server that died would be; a new Proxy on the same port brings it back."""

    def __init__(self, target: str, port: int = 0):
        host, target_port = target.removeprefix("http://").split(":")
        self.target = (host, int(target_port))
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.open = False
        self.listener.close()


def test_a_teacher_server_that_goes_down_stops_the_run_naming_it_and_resume_completes(servers, served_models,
                                                                                       prompts_file, tmp_path):
    proxy = Proxy(servers["teacher"])
    path = write_config(served_models, prompts_file, tmp_path, rollout={},
                        teacher={"backend": "vllm-server",
                                 "server": {"urls": [proxy.url], "timeout_seconds": 5, "attempts": 2,
                                            "backoff_seconds": 0.5}},
                        train={"steps": 4, "save_every": 1, "output_dir": str(tmp_path / "run"),
                               "tensorboard": False, "progress": False})
    metrics = tmp_path / "run" / "metrics.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "opd", "train", str(path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    proxy.close()
    stopped = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    # Within the retry budget (2 attempts, refused at once, 0.5 s apart), with one line naming URL and step.
    assert time.monotonic() - stopped < 30
    lines = [line for line in stderr.splitlines() if line.startswith("opd:")]
    assert len(lines) == 1 and proxy.url in lines[0] and "--resume" in lines[0], stderr[-3000:]
    done = len(metrics.read_text().splitlines())
    assert f"step {done + 1}" in lines[0], (done, lines[0])
    assert "Traceback" not in stderr

    revived = Proxy(servers["teacher"], port=proxy.port)
    try:
        opd_train(path, "--resume")
    finally:
        revived.close()
    steps = [record["step"] for record in records(tmp_path)]
    assert steps == [1, 2, 3, 4]
    assert all(math.isfinite(record["teacher/kl_k1"]) for record in records(tmp_path))
