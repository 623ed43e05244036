"""`opd bench step`'s served variants: the synchronous step on vLLM servers (`opd-served`) against the
asynchronous one (`opd-async`, rollout.async with max_staleness 1), measured side by side in one run.

The student's and the teacher's servers are pinned to one core (generation and scoring: the engine side),
each variant's training process to another (training), so that overlapping them can show. Both variants
use the same servers, models and prompts (the models of `bench/step.py`); each trains in a fresh process.
Figures per timed step (the first is the warm-up): generation = rollout + scoring seconds, training =
train seconds (weight sync included), and the step's wall time; the async step is judged against
max(generation, training) of its own run.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from opd.bench import run_in_subprocess, unmeasured_row

VARIANTS = ("opd-served", "opd-async")
SERVER_CORE, TRAINER_CORE = 0, 1


def run(size: dict, build: Callable[[Path, dict], list[str]]) -> list[dict]:
    """Both variants against one pair of servers started here, on the models and prompts `build` writes
    (bench/step.py's); an error row for each when it cannot run."""
    from opd.served.launch import Server, ServeSettings

    if not {SERVER_CORE, TRAINER_CORE} <= os.sched_getaffinity(0):
        return [{"variant": v, "error": f"needs cores {SERVER_CORE} and {TRAINER_CORE}"} for v in VARIANTS]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        prompts = build(root, size)
        (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        servers = [Server(ServeSettings(model=str(root / name), port=_free_port(), max_model_len=512,
                                        kv_cache_gib=0.25, max_logprobs=1, dtype="float32"),
                          log=root / f"{name}.log", cpus=frozenset({SERVER_CORE}))
                   for name in ("student", "teacher")]
        try:
            for server in servers:
                server.wait_ready(900)
            urls = [server.url for server in servers]
            return [run_in_subprocess("opd.bench.served_step", variant, str(root), *urls, json.dumps(size),
                                      timeout=1800) for variant in VARIANTS]
        finally:
            for server in servers:
                server.stop()


def run_variant(variant: str, root: Path, student_url: str, teacher_url: str, size: dict) -> dict:
    import torch

    from opd.config import load_config
    from opd.runtime.monitor import read_metrics
    from opd.train import train

    os.sched_setaffinity(0, {TRAINER_CORE})
    torch.set_num_threads(1)
    output = root / variant
    config = load_config(base={
        "student": {"path": str(root / "student")},
        "teachers": [{"domain": "default", "path": str(root / "teacher"), "reference": None,
                      "backend": "vllm-server", "server": {"urls": [teacher_url]}}],
        "data": {"path": str(root / "prompts.jsonl"), "shuffle": False, "max_prompt_tokens": 64},
        "rollout": {"prompts_per_step": size["prompts"], "samples_per_prompt": 1, "max_new_tokens": size["new_tokens"],
                    "backend": "vllm-server", "async": variant == "opd-async", "max_staleness": 1,
                    "server": {"urls": [student_url], "sync": "folder", "sync_folder": str(output / "sync")}},
        "objective": {"name": "opd", "score_temperature": 1.0},
        "optim": {"lr": 1e-5, "micro_batch_size": size["prompts"]},
        "train": {"steps": size["steps"] + 1, "output_dir": str(output / "run"), "save_every": 0,
                  "tensorboard": False, "progress": False},
    })
    train(config)
    records = read_metrics(output / "run" / "metrics.jsonl")[1:]  # the first step is the warm-up

    def mean(key: str) -> float:
        return sum(r[key] for r in records) / len(records)

    return {"variant": variant, "step_seconds": mean("perf/step_seconds"),
            "generation_seconds": mean("perf/rollout_seconds") + mean("perf/score_seconds"),
            "training_seconds": mean("perf/train_seconds"), "steps": len(records), "size": size,
            "busy_fraction": mean("perf/engine_busy_fraction") if variant == "opd-async" else None}


def format_table(results: list[dict]) -> str:
    by_name = {r["variant"]: r for r in results}
    lines = ["| variant | step s | generation s | training s | step / max(generation, training) |",
             "|---|---:|---:|---:|---:|"]
    for name in VARIANTS:
        row = by_name.get(name)
        missing = unmeasured_row(name, row, 4)
        if missing:
            lines.append(missing)
            continue
        bound = max(row["generation_seconds"], row["training_seconds"])
        lines.append(f"| {name} | {row['step_seconds']:.3f} | {row['generation_seconds']:.3f} | "
                     f"{row['training_seconds']:.3f} | {row['step_seconds'] / bound:.2f} |")
    served, pipelined = by_name.get("opd-served"), by_name.get("opd-async")
    if served and pipelined and "error" not in served and "error" not in pipelined:
        lines.append(f"\nasync / sync step time: {pipelined['step_seconds'] / served['step_seconds']:.2f} "
                     f"(engines busy {pipelined['busy_fraction']:.0%} of the async step)")
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    print(json.dumps(run_variant(sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5]))))
