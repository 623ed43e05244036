"""rollout.server.sync: nccl (served/nccl.py): what runs without a GPU here (the weight source against vLLM's
own check of it, the start-up refusals, the servers' weight-transfer endpoint), and the transfer itself
where CUDA and a GPU build of vLLM are present (marked gpu)."""

from __future__ import annotations

import http.server
import sys
import threading

import pytest
import torch
from conftest import make_config
from support import parameters_of

pytest.importorskip("vllm")

from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine  # noqa: E402

from opd.checks import StartupError, check_launch  # noqa: E402
from opd.rollout.vllm import policy_weights  # noqa: E402
from opd.runtime.lora import attach_adapters  # noqa: E402
from opd.runtime.models import load_model  # noqa: E402
from opd.served import nccl  # noqa: E402
from opd.served.checks import ServedModelMismatch, _check_weight_transfer  # noqa: E402
from opd.served.client import RetrySettings, ServerClient  # noqa: E402


def _lora_student(model_dir):
    from opd.config import LoraSettings

    student = attach_adapters(load_model(str(model_dir / "student")), LoraSettings(rank=4, alpha=8.0))
    with torch.no_grad():  # B starts at 0: move it so that the merged weights differ from the base's
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    return student


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_weight_source_yields_what_it_declares_as_vllm_checks_it(model_dir, lora):
    """vLLM sizes its receive buffers from metadata(); its own sender check (`_checked_iter`) must pass over
    our iteration, which must be the weights the folder sync would write (LoRA merged)."""
    model = _lora_student(model_dir) if lora else load_model(str(model_dir / "student"))
    source = nccl.weight_source(model, torch.device("cpu"))
    meta = source.metadata()
    sent = dict(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))
    expected = dict(policy_weights(model))
    assert list(sent) == [m.name for m in meta] == list(expected)
    assert all(torch.equal(sent[name], expected[name]) for name in expected)
    assert not any("lora_" in name or "base_layer" in name for name in sent)
    if lora:  # the merged weight, not the frozen base's
        base = parameters_of(model_dir / "student")
        assert any(not torch.equal(sent[name], base[name]) for name in base if name in sent)
    # A declaration that disagrees with the iteration is what the check exists for: it must fail.
    with pytest.raises(ValueError, match="disagrees|declared"):
        list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta[:-1]))


def _nccl_config(model_dir, prompts_file, tmp_path):
    return make_config(model_dir, prompts_file, tmp_path / "run", rollout={
        "backend": "vllm-server", "server": {"urls": ["http://127.0.0.1:9"], "sync": "nccl",
                                             "nccl_address": "127.0.0.1:29600"}})


def _launch(config, *, cuda: bool) -> None:
    check_launch(config, world_size=1, cuda=cuda, resume=False, checkpoint=None)


def test_sync_nccl_stops_at_start_up_without_cuda(model_dir, prompts_file, tmp_path):
    with pytest.raises(StartupError, match=r"rollout.server.sync: nccl .* no CUDA device .* use sync: folder"):
        _launch(_nccl_config(model_dir, prompts_file, tmp_path), cuda=False)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written


def test_sync_nccl_stops_at_start_up_without_vllm_here(model_dir, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm.distributed.weight_transfer.nccl_engine", None)  # import fails
    with pytest.raises(StartupError, match=r"rollout.server.sync: nccl .* cannot import it .* install vllm"):
        _launch(_nccl_config(model_dir, prompts_file, tmp_path), cuda=True)


def test_a_server_started_by_opd_serve_has_the_weight_transfer_endpoints(servers):
    """The control plane the NCCL sync drives answers on a real server (`/get_world_size`: one worker here)."""
    client = ServerClient(servers["student"], RetrySettings(timeout_seconds=30))
    assert client.request("GET", "/get_world_size")["world_size"] == 1
    _check_weight_transfer(client, f"rollout.server: {client.url}")


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the handler's method name)
        self.send_response(404)
        self.end_headers()
        self.wfile.write(b'{"detail": "Not Found"}')

    def log_message(self, *args):
        pass


def test_a_server_without_weight_transfer_endpoints_is_refused_naming_the_flags():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ServedModelMismatch, match=r"no weight-transfer endpoints.*--weight-transfer-config"):
            _check_weight_transfer(ServerClient(url, RetrySettings(timeout_seconds=5)), f"rollout.server: {url}")
    finally:
        server.shutdown()
