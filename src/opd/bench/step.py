"""`opd bench step`: one full on-policy distillation step (generate, score, update), opd vs TRL.

Both sides train the same tiny student against the same teacher on the same prompts, one response per
prompt, the same generation length, batch size and learning rate, with HF `generate` and no gradient
checkpointing. TRL's side is its maintained on-policy trainer, `DistillationTrainer` (reverse KL, beta = 1,
the configuration TRL recommends over GKD with lmbda = 1). Each side runs in a fresh process; throughput is
generated tokens (prompts x max_new_tokens x timed steps: random tiny models practically never stop early,
and opd's measured count is reported beside it) per second over the steps after a warm-up, and memory is
the process's peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from opd.bench import colocated_step, packed_step, ratio_rows, run_in_subprocess, served_step

# torch, trl and the opd trainer are imported inside the functions that run them: each variant's process
# loads only its own side, so the peak RSS it reports is its own (and trl is not a dependency of opd).

# heads: head_dim = hidden / heads is 32 or 64, sizes vLLM's CPU attention has kernels for.
QUICK = {"hidden": 64, "layers": 2, "heads": 2, "vocab": 512, "prompts": 8, "new_tokens": 16, "steps": 4}
FULL = {"hidden": 256, "layers": 4, "heads": 4, "vocab": 16384, "prompts": 16, "new_tokens": 128, "steps": 6}
VARIANTS = ("trl", "opd", "opd-vllm")  # opd-vllm: opd with rollout.backend vllm
# On vLLM servers, synchronous and asynchronous (bench/served_step.py: one server core, one trainer core).
SERVED_VARIANTS = ("opd-served", "opd-async")
# Two FSDP2 processes, a vLLM engine in each against HF generate in each (bench/colocated_step.py).
COLOCATED_VARIANTS = colocated_step.VARIANTS
# The training step padded against packed, and consecutive against length-grouped micro-batches, on a batch of
# widely varying response lengths (bench/packed_step.py).
PACKED_VARIANTS = packed_step.VARIANTS
ALL_VARIANTS = VARIANTS + SERVED_VARIANTS + COLOCATED_VARIANTS + PACKED_VARIANTS


def _build(root: Path, size: dict) -> list[str]:
    from opd.runtime.tiny import build_model, build_tokenizer

    corpus = [f"problem {i}: what is {i} plus {2 * i}? the answer is {3 * i}." for i in range(4000)]
    corpus += [" ".join(f"w{j}{i % 97}" for j in range(20)) for i in range(4000)]
    tokenizer = build_tokenizer(root / "student", corpus=corpus, vocab_size=size["vocab"])
    for name, seed in (("student", 0), ("teacher", 1)):
        build_model(root / name, tokenizer, hidden_size=size["hidden"], num_layers=size["layers"],
                    num_heads=size["heads"], seed=seed)
    return [f"what is {i} plus {2 * i}?" for i in range(size["prompts"] * (size["steps"] + 1))]


def run_opd(root: Path, prompts: list[str], size: dict, backend: str = "hf") -> dict:
    from opd.config import load_config
    from opd.runtime.monitor import read_metrics
    from opd.train import train

    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    config = load_config(base={
        "student": {"path": str(root / "student")},
        "teachers": [{"domain": "default", "path": str(root / "teacher"), "reference": None}],
        "data": {"path": str(data), "shuffle": False},
        "rollout": {"prompts_per_step": size["prompts"], "samples_per_prompt": 1, "max_new_tokens": size["new_tokens"],
                    "batch_size": size["prompts"], "backend": backend, "vllm": {"kv_cache_gib": 0.25}},
        "objective": {"name": "opd"},
        "optim": {"lr": 1e-5, "micro_batch_size": size["prompts"]},
        "train": {"steps": size["steps"] + 1, "output_dir": str(root / "opd"), "save_every": 0,
                  "tensorboard": False, "progress": False},
    })
    train(config)
    records = read_metrics(root / "opd" / "metrics.jsonl")[1:]  # the first step is the warm-up
    seconds = sum(r["perf/rollout_seconds"] + r["perf/score_seconds"] + r["perf/train_seconds"] for r in records)
    return {"seconds": seconds, "measured_tokens": sum(r["rollout/tokens"] for r in records)}


def run_trl(root: Path, prompts: list[str], size: dict) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "student"))
    student = AutoModelForCausalLM.from_pretrained(str(root / "student"))
    teacher = AutoModelForCausalLM.from_pretrained(str(root / "teacher"))
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    args = DistillationConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=size["prompts"], max_completion_length=size["new_tokens"],
        beta=1.0, temperature=1.0, learning_rate=1e-5, max_steps=size["steps"] + 1, logging_steps=1, report_to="none",
        use_cpu=True, save_strategy="no", gradient_checkpointing=False, shuffle_dataset=False, bf16=False,
        disable_dropout=True,
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.starts, self.ends = [], []

        def on_step_begin(self, *unused, **kwargs):
            self.starts.append(time.perf_counter())

        def on_step_end(self, *unused, **kwargs):
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return {"seconds": sum(e - s for s, e in list(zip(timer.starts, timer.ends))[1:]), "measured_tokens": None}


def run_variant(variant: str, quick: bool) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    size = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        prompts = _build(root, size)
        if variant == "trl":
            result = run_trl(root, prompts, size)
        else:
            result = run_opd(root, prompts, size, backend="vllm" if variant == "opd-vllm" else "hf")
    tokens = size["prompts"] * size["new_tokens"] * size["steps"]
    return {"variant": variant, **result, "tokens_per_second": tokens / result["seconds"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "size": size}


def run(quick: bool = False, variants: tuple[str, ...] = ALL_VARIANTS) -> list[dict]:
    unknown = sorted(set(variants) - set(ALL_VARIANTS))
    if unknown:
        raise ValueError(f"opd bench step --variants: unknown {unknown}; choose from {ALL_VARIANTS}")
    results = [run_in_subprocess("opd.bench.step", variant, *(["--quick"] if quick else []))
               for variant in VARIANTS if variant in variants]
    # Each pair runs whole when either is asked for: its two variants are judged against each other.
    if any(variant in variants for variant in SERVED_VARIANTS):
        results += served_step.run(QUICK if quick else FULL, _build)
    if any(variant in variants for variant in COLOCATED_VARIANTS):
        results += colocated_step.run(QUICK if quick else FULL, _build,
                                      tuple(v for v in COLOCATED_VARIANTS if v in variants))
    if any(variant in variants for variant in PACKED_VARIANTS):
        results += packed_step.run(QUICK if quick else FULL, _build, rounds=2 if quick else 3,
                                   variants=tuple(v for v in PACKED_VARIANTS if v in variants))
    return results


def format_table(results: list[dict]) -> str:
    served = [r for r in results if r["variant"] in SERVED_VARIANTS]
    colocated = [r for r in results if r["variant"] in COLOCATED_VARIANTS]
    packed = [r for r in results if r["variant"] in PACKED_VARIANTS]
    results = [r for r in results if r["variant"] in VARIANTS]
    tables = [_trl_table(results)] if results else []
    if served:
        tables.append(served_step.format_table(served))
    if colocated:
        tables.append(colocated_step.format_table(colocated))
    if packed:
        tables.append(packed_step.format_table(packed))
    return "\n\n".join(tables)


def _trl_table(results: list[dict]) -> str:
    by_name = {r["variant"]: r for r in results}
    lines = ["| trainer | tokens/s | peak RSS MiB | throughput / TRL | memory / TRL |", "|---|---:|---:|---:|---:|"]
    lines += ratio_rows(by_name, [name for name in VARIANTS if name in by_name], "trl",
                        {"trl": "TRL DistillationTrainer", "opd": "opd", "opd-vllm": "opd, vLLM rollouts"})
    for name in ("opd", "opd-vllm"):
        row = by_name.get(name)
        if row and "error" not in row:
            size = row["size"]
            lines.append(f"\n{name} generated {row['measured_tokens']:.0f} of the "
                         f"{size['prompts'] * size['new_tokens'] * size['steps']} tokens counted for every side.")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run_variant(sys.argv[1], "--quick" in sys.argv)))
