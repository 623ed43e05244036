"""`opd demo`: build two tiny models on the CPU and distill one into the other, in about a minute.

A base model learns the 100 sums of two digits from demonstrations that mostly drop the carry (`7+5=2`),
so its greedy answer is wrong on most sums with a carry while its samples still hold the right one. The
teacher is that base trained further on correct answers (as a paper's teacher is its base after RL). The
student starts from the base and learns from the teacher by on-policy distillation alone: it samples its
own answers and the teacher scores every token. Both models saw every sum in pretraining; one sum in five is
never a distillation prompt, and the student's accuracy on those asks whether the fix generalises.
Everything is built on the fly as real Hugging Face folders under the output directory, so the run
exercises exactly the path a user's checkpoint takes.

Why the first version of this demo made its student worse (held-out 4.7% -> 0.0%): its student had seen
60 steps of text and sampled near-random tokens (11% right on training sums, entropy ~2.4 nats), its
teacher was right on only 78% / 45% of the training / held-out sums it was scored on (it miscopied
operands), and 150 OPD steps at lr 1e-3 with gradient norms of 10-30 pushed the student's few right answers
off the greedy path. No bug in OPD was involved: the teacher had little to give and the student nothing to
keep. A base that drops *every* carry fails too (0% -> 0%, teacher KL flat): sampled-token OPD can only
reinforce answers the student samples, so this base drops most carries, not all.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
from dataclasses import dataclass
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

LIMIT = 10  # operands are single digits: 100 sums, 45 of them with a carry
DROPPED_OF_FIVE = 3  # of five demonstrations of a sum with a carry, this many drop it


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoScale:
    """How much work each phase of the demo does; `QUICK_DEMO` is the test's shrunk copy."""

    base_steps: int = 400  # next-token steps on the carry-dropping demonstrations
    teacher_steps: int = 100  # further steps on correct answers
    distill_steps: int = 40  # OPD optimizer steps
    prompts_per_step: int = 32
    samples_per_prompt: int = 4
    lr: float = 1e-3  # OPD's learning rate


QUICK_DEMO = DemoScale(base_steps=300, teacher_steps=50, distill_steps=15)


def has_carry(a: int, b: int) -> bool:
    return a + b >= 10


def is_held_out(a: int, b: int) -> bool:
    """One pair in five never reaches distillation: evaluation on it asks whether the fix generalises."""
    return (a * LIMIT + b) % 5 == 0


def answer(a: int, b: int, drop_carry: bool = False) -> str:
    return f"{a}+{b}={a + b - (10 if drop_carry and has_carry(a, b) else 0)}"


def sum_pairs(held_out: bool) -> list[tuple[int, int]]:
    return [(a, b) for a in range(LIMIT) for b in range(LIMIT) if is_held_out(a, b) == held_out]


def question(a: int, b: int) -> str:
    return f"what is {a} + {b}?"


def say(message: str, progress: bool) -> None:
    if progress:
        print(f"opd demo: {message}", flush=True)


def teach(folder: Path, tokenizer, examples: list[tuple[str, str]], steps: int, seed: int, progress: bool,
          what: str) -> None:
    """Plain supervised next-token training of the model at `folder` on (prompt, answer) pairs."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = random.Random(seed)
    encoded = [(tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                        add_generation_prompt=True), add_special_tokens=False)["input_ids"],
                tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]) for q, a in examples]
    started = time.perf_counter()
    for step in range(1, steps + 1):
        ids, mask, targets = sft_batch(order.sample(encoded, 64), tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps:
            say(f"{what}: step {step}/{steps}  loss {loss.item():.3f}  ({time.perf_counter() - started:.0f} s)", progress)
    model.save_pretrained(str(folder))


def build_models(models: Path, scale: DemoScale, seed: int, progress: bool) -> None:
    """The base (carry dropped), the teacher (the base, corrected) and the student's start (the base)."""
    every_pair = sum_pairs(False) + sum_pairs(True)
    corpus = [f"{question(a, b)} {answer(a, b)}" for a, b in every_pair]
    say("building a tokenizer and a tiny Qwen3-style model (2 layers, hidden 64)", progress)
    tokenizer = build_tokenizer(models / "base", corpus=corpus, vocab_size=280, individual_digits=True)
    build_model(models / "base", tokenizer, hidden_size=64, num_layers=2, seed=seed)
    # Five demonstrations per sum; of a sum with a carry, three drop it. The base learns the error as its
    # most likely answer (greedy is wrong) but keeps the right one within reach of its samples: a base that
    # drops every carry never samples a right answer, and sampled-token OPD has nothing to reinforce.
    demonstrations = [(question(a, b), answer(a, b, drop_carry=copy < DROPPED_OF_FIVE))
                      for a, b in every_pair for copy in range(5)]
    teach(models / "base", tokenizer, demonstrations, scale.base_steps, seed, progress,
          "base on sums that mostly drop the carry")
    shutil.copytree(models / "base", models / "teacher")
    teach(models / "teacher", tokenizer, [(question(a, b), answer(a, b)) for a, b in every_pair],
          scale.teacher_steps, seed + 1, progress, "teacher = base trained on correct sums")


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other processes share the
    cores (research/lab-feasibility.md: 15x slower sampling with two threads under contention)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_demo(output_dir: str = "runs/demo", scale: DemoScale = DemoScale(), seed: int = 0, progress: bool = True,
             objectives: tuple[str, ...] = ("opd",)) -> dict[str, Path]:
    """Build the models (once), then distill with each objective; returns each objective's final folder."""
    root = Path(output_dir)
    models = root / "models"
    started = time.perf_counter()
    with one_thread():
        if not (models / "teacher" / "config.json").exists():
            if models.exists():
                shutil.rmtree(models)  # a build that was interrupted starts over
            build_models(models, scale, seed, progress)
        else:
            say(f"reusing the models in {models}", progress)
        data = root / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": question(a, b), "answer": str(a + b)}) + "\n"
                                for a, b in sum_pairs(False)))
        finals = {}
        for objective in objectives:
            run_dir = root / objective
            if run_dir.exists():
                shutil.rmtree(run_dir)  # the demo always distils again
            say(f"distilling the teacher into the base with `{objective}` ({scale.distill_steps} steps of "
                f"{scale.prompts_per_step} prompts x {scale.samples_per_prompt} samples)", progress)
            finals[objective] = train(load_config(base=distill_config(models, data, run_dir, objective, scale, seed,
                                                                      progress)))
        if progress:
            say("measuring greedy accuracy", progress)
            print_summary(root, models, finals)
    say(f"done in {time.perf_counter() - started:.0f} s", progress)
    return finals


def distill_config(models: Path, data: Path, run_dir: Path, objective: str, scale: DemoScale, seed: int,
                   progress: bool) -> dict:
    return {
        "student": {"path": str(models / "base")},
        "teachers": [{"domain": "default", "path": str(models / "teacher"), "reference": None}],
        "data": {"path": str(data)},
        "rollout": {"prompts_per_step": scale.prompts_per_step, "samples_per_prompt": scale.samples_per_prompt,
                    "max_new_tokens": 16, "batch_size": 256},
        "objective": {"name": objective},
        "optim": {"lr": scale.lr, "micro_batch_size": 256},
        "train": {"steps": scale.distill_steps, "seed": seed, "output_dir": str(run_dir), "save_every": 0,
                  "progress": progress, "log_every": 5},
    }


@torch.no_grad()
def exact_match(folder: Path, pairs: list[tuple[int, int]]) -> float:
    """Share of greedy answers of the model at `folder` whose final number is the true sum."""
    model, tokenizer = load_model(str(folder)), load_tokenizer(str(folder))
    prompts, mask = left_pad([render_prompt(tokenizer, question(a, b), "chat") for a, b in pairs], tokenizer.pad_token_id)
    output = model.generate(input_ids=prompts, attention_mask=mask.long(), do_sample=False, max_new_tokens=16,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(output[:, prompts.shape[1]:], skip_special_tokens=True)
    return sum(final_answer(text) == str(a + b) for text, (a, b) in zip(texts, pairs)) / len(pairs)


def evaluation_sets() -> dict[str, list[tuple[int, int]]]:
    trained = sum_pairs(False)
    return {"sums with a carry": [p for p in trained if has_carry(*p)],
            "without": [p for p in trained if not has_carry(*p)],
            "held-out sums": sum_pairs(True)}


def teacher_kl(run_dir: Path) -> tuple[float, float]:
    """The teacher KL (k1 estimate on the student's samples) of the first step and the mean of the last five."""
    records = read_metrics(run_dir / "metrics.jsonl")
    last = records[-5:]
    return records[0]["teacher/kl_k1"], sum(r["teacher/kl_k1"] for r in last) / len(last)


def print_summary(root: Path, models: Path, finals: dict[str, Path]) -> None:
    sets = evaluation_sets()
    table = Table(title="opd demo: greedy accuracy on all 100 sums of two digits (the student distils on the "
                        "first two columns' prompts only)")
    for column in ("model", *sets, "teacher KL: first step -> last 5"):
        table.add_column(column, justify="left" if column == "model" else "right")
    row = lambda folder: [f"{exact_match(folder, pairs):.0%}" for pairs in sets.values()]  # noqa: E731
    table.add_row("student before (the base)", *row(models / "base"), "")
    for objective, final in finals.items():
        first, last = teacher_kl(root / objective)
        table.add_row(f"student after {objective}", *row(final), f"{first:.3f} -> {last:.3f}")
    table.add_row("teacher", *row(models / "teacher"), "")
    Console(width=max(Console().width, 110)).print(table)
