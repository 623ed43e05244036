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


def unmeasured_row(name: str, row: dict | None, columns: int) -> str | None:
    """The table row saying why `name` has no figures (`columns` cells after its name), or None if it has."""
    if row is not None and "error" not in row:
        return None
    return f"| {name} | not measured: {row['error'] if row else 'missing'} |" + " |" * (columns - 1)


def ratio_rows(by_name: dict[str, dict], names: list[str], baseline: str, labels: dict[str, str]) -> list[str]:
    """Rows of tokens/s and peak RSS, each also as a ratio to `baseline`'s of the same run (n/a without it)."""
    base, lines = by_name.get(baseline), []
    for name in names:
        row = by_name.get(name)
        missing = unmeasured_row(name, row, 4)
        if missing:
            lines.append(missing)
            continue
        throughput = memory = "n/a"
        if base and "error" not in base:
            throughput = f"{row['tokens_per_second'] / base['tokens_per_second']:.2f}"
            memory = f"{row['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}"
        lines.append(f"| {labels[name]} | {row['tokens_per_second']:.0f} | {row['peak_rss_bytes'] / 2**20:.0f} | "
                     f"{throughput} | {memory} |")
    return lines
