"""`opd bench step`'s colocated variants: two FSDP2 training processes, each sampling its share of the
step's prompts with its own in-process vLLM engine (`opd-colocated`, rollout.backend vllm), against the same
two processes sampling with HF `generate` (`opd-2proc`, the baseline), measured side by side in one run.

Both variants train the models of `bench/step.py` on the same prompts through `opd train --nproc 2` in a
fresh process each (so each engine's start-up, weight gathering and sync are the real ones). Throughput is
counted as in bench/step.py, prompts x max_new_tokens x timed steps (the first step is the warm-up), over
the timed steps' `perf/step_seconds` (rollout, scoring, training and the engines' weight sync); opd's
measured token count is reported beside it. Memory is the peak RSS of the largest process the run started:
a training process, which holds its engine too.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

from opd.bench import ratio_rows, run_in_subprocess

VARIANTS = ("opd-2proc", "opd-colocated")  # the baseline first
PROCESSES = 2
BACKENDS = {"opd-2proc": "hf", "opd-colocated": "vllm"}


def run(size: dict, build: Callable[[Path, dict], list[str]], variants: tuple[str, ...] = VARIANTS) -> list[dict]:
    """Each of `variants` in its own process; both share the models and prompts `build` writes
    (bench/step.py's) in one folder, so neither pays for building them."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        prompts = build(root, size)
        (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        return [run_in_subprocess("opd.bench.colocated_step", variant, str(root), json.dumps(size), timeout=3600)
                for variant in VARIANTS if variant in variants]


def run_variant(variant: str, root: Path, size: dict) -> dict:
    """`opd train --nproc 2` on the shared models; what its metrics and its largest process say."""
    output = root / variant
    output.mkdir()
    config = {
        "student": {"path": str(root / "student")},
        "teachers": [{"domain": "default", "path": str(root / "teacher"), "reference": None}],
        "data": {"path": str(root / "prompts.jsonl"), "shuffle": False},
        "rollout": {"prompts_per_step": size["prompts"], "samples_per_prompt": 1, "max_new_tokens": size["new_tokens"],
                    "batch_size": size["prompts"], "backend": BACKENDS[variant], "vllm": {"kv_cache_gib": 0.25}},
        "objective": {"name": "opd"},
        "optim": {"lr": 1e-5, "micro_batch_size": size["prompts"]},
        "train": {"steps": size["steps"] + 1, "output_dir": str(output / "run"), "save_every": 0,
                  "tensorboard": False, "progress": False},
    }
    (output / "config.yaml").write_text(yaml.safe_dump(config))
    # One thread per process: the two processes share the machine's cores, as they would share its GPUs.
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    process = subprocess.run([sys.executable, "-m", "opd", "train", str(output / "config.yaml"),
                              "--nproc", str(PROCESSES)], capture_output=True, text=True, env=environment)
    if process.returncode != 0:
        raise RuntimeError(f"opd train --nproc {PROCESSES} failed: {process.stderr.strip()[-300:]}")
    records = [json.loads(line) for line in (output / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    seconds = sum(record["perf/step_seconds"] for record in records)
    tokens = size["prompts"] * size["new_tokens"] * size["steps"]
    # RUSAGE_CHILDREN's maxrss: the largest of every process the run started and reaped (launcher, ranks).
    # The backend the run recorded (its validated config), not the one asked for: what was measured.
    backend = yaml.safe_load((output / "run" / "config.yaml").read_text())["rollout"]["backend"]
    return {"variant": variant, "backend": backend, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "measured_tokens": sum(record["rollout/tokens"] for record in records),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "processes": PROCESSES, "size": size}


def format_table(results: list[dict]) -> str:
    by_name = {r["variant"]: r for r in results}
    lines = ["| variant (2 processes, FSDP2) | tokens/s | peak RSS MiB (largest process) | throughput / HF | "
             "memory / HF |", "|---|---:|---:|---:|---:|"]
    lines += ratio_rows(by_name, [name for name in VARIANTS if name in by_name], "opd-2proc",
                        {"opd-2proc": "opd-2proc: HF generate", "opd-colocated": "opd-colocated: a vLLM engine per rank"})
    for name in [name for name in VARIANTS if name in by_name and "error" not in by_name[name]]:
        size = by_name[name]["size"]
        lines.append(f"\n{name} generated {by_name[name]['measured_tokens']:.0f} of the "
                     f"{size['prompts'] * size['new_tokens'] * size['steps']} tokens counted.")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run_variant(sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]))))
