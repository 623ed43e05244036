"""Benchmarks (`opd bench NAME`): each variant runs in a fresh subprocess and every table reports ratios
against a baseline measured in the same run, on the same machine."""

from __future__ import annotations

import json
import subprocess
import sys


def run_in_subprocess(module: str, variant: str, *args: str, timeout: float | None = None,
                      env: dict[str, str] | None = None) -> dict:
    """`python -m module variant *args` in a fresh interpreter: the JSON object its last stdout line prints.

    A variant that fails (an exception, a missing package, a kill for memory, a timeout) comes back as
    `{"variant": ..., "error": why}` for the table to show, never raised and never dropped.
    """
    try:
        process = subprocess.run([sys.executable, "-m", module, variant, *args], capture_output=True, text=True,
                                 timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timeout after {timeout:.0f}s"}
    if process.returncode < 0:
        return {"variant": variant, "error": f"killed by signal {-process.returncode} (likely out of memory)"}
    if process.returncode != 0:
        last = (process.stderr.strip().splitlines() or [f"exited with status {process.returncode}"])[-1]
        return {"variant": variant, "error": last[:200]}
    return json.loads(process.stdout.strip().splitlines()[-1])
