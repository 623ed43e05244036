"""Fixtures (imported by conftest.py, so that the session shares them): real vLLM servers for the
served-backend tests, started by `opd serve` on free ports of 127.0.0.1 and
shared by the whole session (each takes about a minute to start on the CPU), stopped by Ctrl-C (SIGINT)
to `opd serve` at the end, which must stop its server cleanly.

Models: head_dim 32 (vLLM's CPU attention has no kernel for the shared fixtures' 16), float32, one
tokenizer; `other_student` has a tokenizer of another size (a server serving `student` is not its model).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from opd.runtime.tiny import build_model, build_tokenizer, perturb_model

MAX_MODEL_LEN = 512
MAX_LOGPROBS = 8


@pytest.fixture(scope="session")
def served_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served_models")
    tokenizer = build_tokenizer(root / "student")
    build_model(root / "student", tokenizer, hidden_size=64, num_layers=2, num_heads=2, seed=0, initializer_range=0.2)
    perturb_model(root / "student", root / "teacher", scale=1.0, seed=1)
    other = build_tokenizer(root / "other_student", vocab_size=280)
    build_model(root / "other_student", other, hidden_size=64, num_layers=2, num_heads=2, seed=0)
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class StartedServer:
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        """Ctrl-C to `opd serve`: it must stop the vLLM server and exit 0 (else it is terminated, and fails)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                status = self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.terminate()  # opd serve stops its vLLM server on SIGTERM (its own session)
                try:
                    self.process.wait(30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
                raise AssertionError(f"opd serve ignored Ctrl-C for 60 s: {self.log.read_text()[-2000:]}") from None
            assert status == 0, self.log.read_text()[-2000:]


def start_server(model: Path, log: Path) -> StartedServer:
    port = free_port()
    command = [sys.executable, "-m", "opd", "serve", str(model), "--port", str(port), "--max-model-len",
               str(MAX_MODEL_LEN), "--kv-cache-gib", str(1 / 32), "--max-logprobs", str(MAX_LOGPROBS), "--dtype", "float32"]
    handle = open(log, "wb")
    # SIGINT ignored, as a non-interactive shell starts its background jobs (`opd serve ... &` in a script, CI):
    # Ctrl-C (SIGINT) must stop opd serve all the same, and every fixture's teardown checks that it does.
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    return StartedServer(url=f"http://127.0.0.1:{port}", process=process, log=log)


def wait_until_announced(server: StartedServer, timeout: float = 600) -> None:
    """Until `opd serve` printed its URL (it does once the server answers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"at {server.url}" in server.log.read_text(errors="replace"):
            with urllib.request.urlopen(server.url + "/health", timeout=10):
                return
        if server.process.poll() is not None:
            raise RuntimeError(f"opd serve exited with {server.process.returncode}:\n"
                               + server.log.read_text(errors="replace")[-3000:])
        time.sleep(1)
    raise TimeoutError(server.log.read_text(errors="replace")[-3000:])


@pytest.fixture(scope="session")
def servers(served_models, tmp_path_factory):
    """{'student': url, 'teacher': url}: both started at once (they start in parallel), both stopped after."""
    logs = tmp_path_factory.mktemp("server_logs")
    started = {name: start_server(served_models / name, logs / f"{name}.log") for name in ("student", "teacher")}
    try:
        for server in started.values():
            wait_until_announced(server)
        yield {name: server.url for name, server in started.items()}
    finally:
        failures = []
        for server in started.values():  # every server is stopped, even when one of them fails to stop
            try:
                server.stop()
            except AssertionError as error:
                failures.append(error)
        assert not failures, failures
        for server in started.values():  # the vLLM server of each is gone with it: its port is free again
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) != 0, server.url
