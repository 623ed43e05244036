"""`opd bench rollout`: student rollouts per second: HF `generate` (the baseline), opd's HF sampler (its own
decode loop, rollout/decode.py) and vLLM, same model and prompts.

Every variant samples the same tiny Qwen3-style student (built once, saved as an HF folder) on the same chat
prompts, `samples_per_prompt` responses each, the same temperature and length: `generate` as a user would
call it, opd's entry points (`rollout.sample_in_batches` with every row in one call, `VllmEngine.sample`)
with the sampler log-probs recorded. Two workloads: "full length" (an untrained model never writes its end
token, so every row runs to the last step: the loop's own cost against generate's) and "ragged" (an eighth
of the vocabulary ends a row, so rows end at different steps, as a trained model's answers do: what dropping
the rows that ended buys). Each variant runs in a fresh process: one warm-up call (vLLM's includes its
one-off compile of the log-prob op), then timed calls. Throughput counts the tokens actually generated.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from opd.bench import run_in_subprocess, unmeasured_row

VARIANTS = ("generate", "hf", "vllm")
WORKLOADS = ("full length", "ragged")
QUICK = {"hidden": 64, "layers": 2, "heads": 2, "vocab": 512, "prompts": 8, "samples": 4, "new_tokens": 32,
         "repeats": 2}
FULL = {"hidden": 256, "layers": 4, "heads": 4, "vocab": 16384, "prompts": 16, "samples": 4, "new_tokens": 128,
        "repeats": 3}


def build(root: Path, size: dict) -> None:
    from opd.runtime.tiny import build_model, build_tokenizer

    corpus = [f"problem {i}: what is {i} plus {2 * i}? the answer is {3 * i}." for i in range(4000)]
    corpus += [" ".join(f"w{j}{i % 97}" for j in range(20)) for i in range(4000)]
    tokenizer = build_tokenizer(root, corpus=corpus, vocab_size=size["vocab"])
    build_model(root, tokenizer, hidden_size=size["hidden"], num_layers=size["layers"], num_heads=size["heads"],
                seed=0)


def run_variant(variant: str, folder: str, size: dict) -> dict:
    import torch

    from opd.runtime.models import end_of_sequence_ids, load_model, load_tokenizer, render_prompt
    from opd.rollout.batch import SamplingSettings
    from opd.rollout.hf import sample_in_batches

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder)
    prompts = [render_prompt(tokenizer, f"what is {i} plus {2 * i}?", "chat") for i in range(size["prompts"])]
    rows = [p for p in prompts for _ in range(size["samples"])]
    ragged = size.get("workload") == "ragged"
    ends = tuple(range(3, len(tokenizer), 8)) if ragged else end_of_sequence_ids(model, tokenizer)
    settings = SamplingSettings(samples_per_prompt=size["samples"], temperature=1.0, top_p=1.0,
                                max_new_tokens=size["new_tokens"], batch_size=len(rows),
                                end_of_sequence_ids=ends, pad_id=tokenizer.pad_token_id)
    torch.manual_seed(0)  # generate and opd's loop draw alike: the same tokens
    started = time.perf_counter()
    if variant == "vllm":
        from opd.rollout.vllm import EngineSettings, VllmEngine

        engine = VllmEngine(EngineSettings(model_path=folder, dtype="float32", kv_cache_bytes=256 * 2**20,
                                           max_model_len=max(len(p) for p in prompts) + size["new_tokens"],
                                           enforce_eager=True, seed=0, max_logprobs=1))
        sample = lambda: engine.sample(rows, settings)  # noqa: E731
    elif variant == "generate":
        sample = lambda: _plain_generate(model, rows, settings)  # noqa: E731
    else:
        sample = lambda: sample_in_batches(model, rows, settings)  # noqa: E731
    sample()  # warm-up
    startup = time.perf_counter() - started
    tokens, seconds = 0, 0.0
    for _ in range(size["repeats"]):
        begin = time.perf_counter()
        responses = sample()
        seconds += time.perf_counter() - begin
        tokens += int(responses.mask.sum())
    return {"variant": variant, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "startup_seconds": startup, "threads": threads, "size": size}


def _plain_generate(model, rows: list[list[int]], settings):
    """HF `generate` as a user calls it (sampling, no log-probs kept): the baseline; returns an object with
    the generated tokens' mask, as the samplers' Responses do."""
    import types

    import torch
    from transformers import GenerationConfig

    from opd.rollout.batch import left_pad, response_mask_until_end

    ids, mask = left_pad(rows, settings.pad_id)
    config = GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=1.0, top_k=0,
                              max_new_tokens=settings.max_new_tokens, eos_token_id=list(settings.end_of_sequence_ids),
                              pad_token_id=settings.pad_id)
    with torch.inference_mode():
        sequences = model.generate(input_ids=ids, attention_mask=mask.long(), generation_config=config)
    generated, _ = response_mask_until_end(sequences[:, ids.shape[1]:], settings.end_of_sequence_ids)
    return types.SimpleNamespace(mask=generated)


def run(quick: bool = False) -> list[dict]:
    size = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as folder:
        build(Path(folder), size)
        return [{**run_in_subprocess("opd.bench.rollout", variant, folder, json.dumps({**size, "workload": workload})),
                 "workload": workload} for workload in WORKLOADS for variant in VARIANTS]


def format_table(results: list[dict]) -> str:
    lines = ["| workload | sampler | tokens/s | tokens | start-up + warm-up s | threads | throughput / HF generate |",
             "|---|---|---:|---:|---:|---:|---:|"]
    labels = {"generate": "HF generate", "hf": "opd HF sampler (decode loop)", "vllm": "vLLM"}
    for workload in WORKLOADS:
        by_name = {r["variant"]: r for r in results if r["workload"] == workload}
        baseline = by_name.get("generate")
        for name in VARIANTS:
            row = by_name.get(name)
            unmeasured = unmeasured_row(f"{workload} | {labels[name]}", row, 5)
            if unmeasured is not None:
                lines.append(unmeasured)
                continue
            ratio = "n/a"
            if baseline and "error" not in baseline:
                ratio = f"{row['tokens_per_second'] / baseline['tokens_per_second']:.2f}"
            lines.append(f"| {workload} | {labels[name]} | {row['tokens_per_second']:.0f} | {row['tokens']} | "
                         f"{row['startup_seconds']:.1f} | {row['threads']} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run_variant(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))))
