"""`opd demo`: build two tiny models on the CPU and distill one into the other.

A teacher is taught small sums by plain next-token training until it is nearly always right; a student is
taught briefly (it knows the answer format, rarely the sum) and then learns from the teacher by on-policy
distillation alone. Everything is built on the fly as real Hugging Face
folders under the output directory, so the run exercises exactly the path a user's checkpoint takes.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from opd.config import load_config
from opd.grading.graders import final_answer
from opd.rollout.batch import left_pad
from opd.runtime.models import load_model, load_tokenizer, render_prompt
from opd.runtime.monitor import read_metrics
from opd.runtime.tiny import build_model, build_tokenizer, sft_batch
from opd.train import train


def arithmetic_problems(count: int, seed: int, held_out: bool = False) -> list[tuple[str, str]]:
    """Sums of two numbers below 20; one pair in five is held out of training for evaluation."""
    generator = random.Random(seed)
    pairs = [(a, b) for a in range(20) for b in range(20) if ((a * 20 + b) % 5 == 0) == held_out]
    return [(f"what is {a} + {b}?", f"{a} + {b} = {a + b}") for a, b in
            (generator.choice(pairs) for _ in range(count))]


def teach(folder: Path, tokenizer, problems: list[tuple[str, str]], steps: int, seed: int) -> None:
    """Plain supervised next-token training of a tiny model on (prompt, answer) pairs."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = [problems[(step * 16 + i) % len(problems)] for i in range(16)]
        examples = []
        for question, answer in batch:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                   add_generation_prompt=True)
            examples.append((tokenizer(prompt, add_special_tokens=False)["input_ids"],
                             tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]))
        # The demo's models have always trained without the attention mask: with right padding it only
        # changes what the padding positions see, which carry no loss.
        ids, _, targets = sft_batch(examples, tokenizer.pad_token_id)
        loss = model(input_ids=ids, labels=targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(folder))


def run_demo(output_dir: str = "runs/demo", steps: int = 150, teacher_steps: int = 400, student_steps: int = 60,
             seed: int = 0, progress: bool = True, objectives: tuple[str, ...] = ("opd", "tropd")) -> Path:
    """Build the models (once), then distill with each objective; returns the last run's final folder."""
    root = Path(output_dir)
    models = root / "models"
    problems = arithmetic_problems(512, seed)
    corpus = [f"{q} {a}" for q, a in problems]
    if not (models / "teacher" / "config.json").exists():
        tokenizer = build_tokenizer(models / "student", corpus=corpus, vocab_size=320)
        build_model(models / "student", tokenizer, hidden_size=64, num_layers=2, seed=seed)
        build_model(models / "teacher", tokenizer, hidden_size=64, num_layers=2, seed=seed + 1)
        teach(models / "teacher", tokenizer, problems, teacher_steps, seed)
        # The student knows the format but not the sums yet (a distillation student is pretrained too).
        teach(models / "student", tokenizer, problems, student_steps, seed + 1)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in problems))
    evaluation = {"training sums": arithmetic_problems(64, seed + 2000),
                  "held-out sums": arithmetic_problems(64, seed + 1000, held_out=True)}
    before = {name: exact_match(models / "student", problems) for name, problems in evaluation.items()}
    results = {}
    for objective in objectives:
        run_dir = root / objective
        if run_dir.exists():
            shutil.rmtree(run_dir)  # the demo always starts over
        config = load_config(base={
            "student": {"path": str(models / "student")},
            "teachers": [{"domain": "default", "path": str(models / "teacher"), "reference": None}],
            "data": {"path": str(data)},
            "rollout": {"prompts_per_step": 16, "samples_per_prompt": 4, "max_new_tokens": 16},
            "objective": {"name": objective},
            "optim": {"lr": 1e-3, "micro_batch_size": 32},
            "train": {"steps": steps, "seed": seed, "output_dir": str(run_dir), "save_every": 0, "progress": progress},
        })
        results[objective] = train(config)
    if progress:
        print_summary(root, evaluation, before, models / "teacher", results)
    return results[objectives[-1]]


@torch.no_grad()
def exact_match(folder: Path, problems: list[tuple[str, str]]) -> float:
    """Greedy answers of the model at `folder` whose final number equals the true sum."""
    model, tokenizer = load_model(str(folder)), load_tokenizer(str(folder))
    prompts, mask = left_pad([render_prompt(tokenizer, q, "chat") for q, _ in problems], tokenizer.pad_token_id)
    output = model.generate(input_ids=prompts, attention_mask=mask.long(), do_sample=False, max_new_tokens=16,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(output[:, prompts.shape[1]:], skip_special_tokens=True)
    return sum(final_answer(text) == answer.split("= ")[-1] for text, (_, answer) in zip(texts, problems)) / len(problems)


def print_summary(root: Path, evaluation: dict, before: dict, teacher: Path, finals: dict[str, Path]) -> None:
    table = Table(title="opd demo: distilling a tiny arithmetic teacher (greedy exact match on 64 sums)")
    for column in ("model", "teacher KL (k1), first step", "last 5 steps", *evaluation):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row("student before", "", "", *(f"{before[name]:.1%}" for name in evaluation))
    for objective, final in finals.items():
        records = read_metrics(root / objective / "metrics.jsonl")
        last = sum(r["teacher/kl_k1"] for r in records[-5:]) / min(5, len(records))
        table.add_row(f"student after {objective}", f"{records[0]['teacher/kl_k1']:.3f}", f"{last:.3f}",
                      *(f"{exact_match(final, problems):.1%}" for problems in evaluation.values()))
    table.add_row("teacher", "", "", *(f"{exact_match(teacher, problems):.1%}" for problems in evaluation.values()))
    Console().print(table)
