"""`opd bench overhead`: opd's full step against the sum of its bare parts, measured in the same run.

Bare parts, each timed alone on the same models, prompts and generation length:
- `generate`: HF `generate` of the same number of responses (sampling, same max_new_tokens);
- `teacher forward`: one no-grad forward of the teacher over prompt + response;
- `student forward + backward`: a plain full-logits cross-entropy forward and backward of the student.
opd's step adds what those omit: sampler log-prob recording, chunked scoring, the objective, metrics and the
optimizer step. Ratio = opd step / (sum of bare parts); the target is <= 1.10.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch


def _models(root: Path, hidden: int, layers: int, vocab: int):
    from opd.runtime.tiny import build_model, build_tokenizer

    corpus = [f"problem {i}: what is {i} plus {2 * i}? the answer is {3 * i}." for i in range(2000)]
    tokenizer = build_tokenizer(root / "student", corpus=corpus, vocab_size=vocab)
    build_model(root / "student", tokenizer, hidden_size=hidden, num_layers=layers, num_heads=4, seed=0)
    build_model(root / "teacher", tokenizer, hidden_size=hidden, num_layers=layers, num_heads=4, seed=1)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {i} plus {2 * i}?"}) + "\n" for i in range(64)))
    return prompts


def run(quick: bool = False, repeats: int = 3) -> dict:
    from opd.assemble import assemble, seed_everything
    from opd.config import load_config
    from opd.train import TrainState, build_optimizer, collect_settings_for, run_one_step, StepSettings

    hidden, layers, vocab, rows, tokens = (64, 2, 512, 8, 16) if quick else (256, 4, 4096, 32, 64)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        prompts = _models(root, hidden, layers, vocab)
        config = load_config(base={
            "student": {"path": str(root / "student")},
            "teachers": [{"domain": "default", "path": str(root / "teacher"), "reference": None}],
            "data": {"path": str(prompts)},
            "rollout": {"prompts_per_step": rows, "samples_per_prompt": 1, "max_new_tokens": tokens,
                        "batch_size": rows},
            "objective": {"name": "opd"},
            "optim": {"micro_batch_size": rows},
            "train": {"steps": 100, "output_dir": str(root / "run"), "tensorboard": False, "progress": False},
        })
        seed_everything(0)
        run_objects = assemble(config)
        state = TrainState(student=run_objects.student, optimizer=build_optimizer(run_objects.student, config.optim))
        settings = StepSettings(aggregation="token-mean", micro_batch_size=rows, temperature=1.0, chunk_size=512,
                                max_grad_norm=1.0)
        collect_settings = collect_settings_for(config, run_objects.objective)
        run_one_step(run_objects, state, config, settings, collect_settings, {})  # warm-up
        step_times, bare = [], {"generate": [], "teacher forward": [], "student forward + backward": []}
        for _ in range(repeats):
            started = time.perf_counter()
            values = run_one_step(run_objects, state, config, settings, collect_settings, {})
            step_times.append(time.perf_counter() - started)
            for name, seconds in _bare_parts(run_objects, config, rows, tokens).items():
                bare[name].append(seconds)
        step = min(step_times)
        parts = {name: min(times) for name, times in bare.items()}
        return {"sizes": {"hidden": hidden, "layers": layers, "vocab": vocab, "rows": rows, "new_tokens": tokens},
                "step_seconds": step, "parts_seconds": parts, "ratio": step / sum(parts.values()),
                "response_tokens": values["rollout/tokens"]}


def _bare_parts(run_objects, config, rows: int, tokens: int) -> dict[str, float]:
    from transformers import GenerationConfig

    from opd.rollout.batch import left_pad

    student, teacher = run_objects.student, run_objects.scorers["default"].teacher
    prompts, mask = left_pad(run_objects.prompt_ids[:rows], run_objects.sampling.pad_id)
    times = {}
    started = time.perf_counter()
    with torch.no_grad():
        sequences = student.generate(input_ids=prompts, attention_mask=mask.long(), generation_config=GenerationConfig(
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=tokens,
            eos_token_id=list(run_objects.sampling.end_of_sequence_ids), pad_token_id=run_objects.sampling.pad_id))
    times["generate"] = time.perf_counter() - started
    attention = torch.cat([mask, torch.ones(rows, sequences.shape[1] - mask.shape[1], dtype=torch.bool)], 1).long()
    started = time.perf_counter()
    with torch.no_grad():
        teacher(input_ids=sequences, attention_mask=attention)
    times["teacher forward"] = time.perf_counter() - started
    started = time.perf_counter()
    logits = student(input_ids=sequences, attention_mask=attention).logits[:, mask.shape[1] - 1 : -1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             sequences[:, mask.shape[1]:].reshape(-1))
    loss.backward()
    student.zero_grad(set_to_none=True)
    times["student forward + backward"] = time.perf_counter() - started
    return times


def format_table(result: dict) -> str:
    lines = ["| part | seconds |", "|---|---:|"]
    for name, seconds in result["parts_seconds"].items():
        lines.append(f"| bare {name} | {seconds:.3f} |")
    lines.append(f"| **sum of bare parts** | {sum(result['parts_seconds'].values()):.3f} |")
    lines.append(f"| **opd step** | {result['step_seconds']:.3f} |")
    lines.append(f"| **ratio (opd / bare)** | {result['ratio']:.3f} |")
    return "\n".join(lines)
