"""scripts/setup.sh checks the room on disk before pip writes anything (a CI run once died halfway through
`pip install` with "[Errno 28] No space left on device"). The script runs for real, into a folder of the test's;
the check stops it before any environment exists, or lets it through to a step the test makes fail on purpose."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup(tmp_path: Path, min_free_gb: int) -> subprocess.CompletedProcess:
    # PYTHON names no interpreter, so a script that passes the check stops at once where it creates the venv.
    env = {**os.environ, "OPD_VENV": str(tmp_path / "venv"), "TMPDIR": str(tmp_path),
           "OPD_SETUP_MIN_FREE_GB": str(min_free_gb), "PYTHON": str(tmp_path / "no-such-python")}
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                          timeout=120)


def test_setup_stops_before_installing_when_the_disk_is_short(tmp_path):
    free_gb = shutil.disk_usage(tmp_path).free // 2**30
    result = _setup(tmp_path, free_gb + 2)
    assert result.returncode == 1, result.stderr
    match = re.search(r"\[setup\] only (\d+) GB free on the file system of (\S+); setting up (\S+) needs about (\d+) GB",
                      result.stderr)
    assert match, result.stderr
    assert abs(int(match.group(1)) - free_gb) <= 1  # the figure df gives is the free space, in GB
    assert match.group(3) == str(tmp_path / "venv") and int(match.group(4)) == free_gb + 2
    assert "creating" not in result.stdout and not (tmp_path / "venv").exists()  # nothing was installed


def test_setup_goes_on_when_there_is_room(tmp_path):
    result = _setup(tmp_path, max(shutil.disk_usage(tmp_path).free // 2**30 - 2, 0))
    assert "GB free" not in result.stderr, result.stderr
    assert f"[setup] creating {tmp_path / 'venv'}" in result.stdout  # past the check, failing where the test wants
    assert result.returncode != 0
