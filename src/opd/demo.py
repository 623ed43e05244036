"""The README's embedded default until the lab exists: build two tiny models and distill one into the other.

A teacher is taught a small arithmetic format by plain next-token training; a fresh student then learns
it from the teacher by on-policy distillation alone. Everything is built on the fly as real Hugging Face
folders under the output directory, so the run exercises exactly the path a user's checkpoint takes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from opd.config import load_config
from opd.tiny import build_model, build_tokenizer
from opd.train import train


def arithmetic_problems(count: int, seed: int) -> list[tuple[str, str]]:
    generator = random.Random(seed)
    problems = []
    for _ in range(count):
        a, b = generator.randint(0, 49), generator.randint(0, 49)
        problems.append((f"what is {a} + {b}?", f"{a} + {b} = {a + b}"))
    return problems


def teach_teacher(folder: Path, tokenizer, problems: list[tuple[str, str]], steps: int, seed: int) -> None:
    """Plain supervised next-token training of the tiny teacher on (prompt, answer) pairs."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = [problems[(step * 16 + i) % len(problems)] for i in range(16)]
        sequences, labels = [], []
        for question, answer in batch:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                   add_generation_prompt=True)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            sequences.append(prompt_ids + answer_ids)
            labels.append([-100] * len(prompt_ids) + answer_ids)
        width = max(len(s) for s in sequences)
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
        targets = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
        loss = model(input_ids=ids, labels=targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(folder))


def run_demo(output_dir: str = "runs/demo", steps: int = 30, teacher_steps: int = 150, seed: int = 0,
             progress: bool = True) -> Path:
    root = Path(output_dir)
    models = root / "models"
    problems = arithmetic_problems(512, seed)
    corpus = [f"{q} {a}" for q, a in problems]
    if not (models / "teacher" / "config.json").exists():
        tokenizer = build_tokenizer(models / "student", corpus=corpus, vocab_size=320)
        build_model(models / "student", tokenizer, hidden_size=64, num_layers=2, seed=seed)
        build_model(models / "teacher", tokenizer, hidden_size=64, num_layers=2, seed=seed + 1)
        teach_teacher(models / "teacher", tokenizer, problems, teacher_steps, seed)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in problems))
    config = load_config(base={
        "student": {"path": str(models / "student")},
        "teachers": [{"domain": "default", "path": str(models / "teacher"), "reference": None}],
        "data": {"path": str(data)},
        "rollout": {"prompts_per_step": 8, "samples_per_prompt": 4, "max_new_tokens": 16},
        "objective": {"name": "opd"},
        "optim": {"lr": 2e-3, "micro_batch_size": 16},
        "train": {"steps": steps, "seed": seed, "output_dir": str(root / "run"), "save_every": 0,
                  "progress": progress},
    })
    run_dir = root / "run"
    if (run_dir / "checkpoints").exists():
        import shutil

        shutil.rmtree(run_dir)
    return train(config)
