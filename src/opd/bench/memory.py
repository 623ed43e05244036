"""`opd bench memory`: the loss path's peak memory and time at a large vocabulary, opd vs naive vs TRL.

The loss path is what one OPD step spends beyond the model bodies: teacher top-k scoring (k = 64), the
student's sampled-token log-probs and log-probs at the teacher's top-k ids, the K1 policy-gradient term
plus the top-k forward KL, and the backward pass. Variants, each in a fresh process so that peak RSS is
its own:
- `opd`: chunked scoring (scoring.py), recomputation in backward.
- `naive`: full `[tokens, vocab]` logits for teacher and student, autograd keeps them.
- `trl`: TRL's GKD `generalized_jsd_loss` on full logits (beta 0.5), the loss TRL users distill with.
Peak extra memory = peak RSS minus the RSS after the inputs (hidden states, output heads) are allocated.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass

from opd.bench import run_in_subprocess

# torch and each variant's code (trl is not a dependency of opd) are imported inside `run_variant`, in the
# variant's own process, so that it loads only what it measures.

VARIANTS = ("naive", "opd", "trl")


@dataclass(frozen=True, kw_only=True, slots=True)
class MemorySize:
    tokens: int
    vocab: int
    hidden: int


FULL = (MemorySize(tokens=2048, vocab=151_936, hidden=1024), MemorySize(tokens=8192, vocab=151_936, hidden=1024),
        MemorySize(tokens=16384, vocab=151_936, hidden=1024))
QUICK = (MemorySize(tokens=512, vocab=16_384, hidden=128), MemorySize(tokens=2048, vocab=16_384, hidden=128))
TOPK = 64


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(variant: str, size: MemorySize, chunk_size: int = 512) -> dict:
    """Runs in the worker process: one forward + backward of the loss path; returns peak extra bytes and time."""
    import torch

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(size.tokens, size.hidden, generator=g).requires_grad_()
    student_weight = (torch.randn(size.vocab, size.hidden, generator=g) / size.hidden**0.5).requires_grad_()
    teacher_hidden = torch.randn(size.tokens, size.hidden, generator=g)
    teacher_weight = torch.randn(size.vocab, size.hidden, generator=g) / size.hidden**0.5
    targets = torch.randint(0, size.vocab, (size.tokens,), generator=g)
    baseline = _rss_bytes()
    started = time.perf_counter()
    if variant == "opd":
        from opd.functional import topk_forward_kl
        from opd.scoring import student_token_logprobs, teacher_token_scores

        teacher_logprobs, topk_ids, topk_logprobs, _ = teacher_token_scores(
            teacher_hidden, teacher_weight, None, targets, topk=TOPK, chunk_size=chunk_size)
        student_logprobs, student_topk, _ = student_token_logprobs(
            student_hidden, student_weight, None, targets, topk_ids, chunk_size=chunk_size, with_entropy=False)
        loss = _loss(student_logprobs, teacher_logprobs, student_topk, topk_logprobs, topk_forward_kl)
    elif variant == "naive":
        from opd.functional import topk_forward_kl

        teacher_full = torch.log_softmax(teacher_hidden @ teacher_weight.T, dim=-1)
        topk_logprobs, topk_ids = teacher_full.topk(TOPK, dim=-1)
        teacher_logprobs = teacher_full.gather(1, targets[:, None]).squeeze(1)
        student_full = torch.log_softmax(student_hidden @ student_weight.T, dim=-1)
        student_logprobs = student_full.gather(1, targets[:, None]).squeeze(1)
        loss = _loss(student_logprobs, teacher_logprobs, student_full.gather(1, topk_ids), topk_logprobs,
                     topk_forward_kl)
    elif variant == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T
        student_logits = student_hidden @ student_weight.T
        loss = GKDTrainer.generalized_jsd_loss(student_logits[None], teacher_logits[None], beta=0.5)
    else:
        raise ValueError(f"unknown variant {variant!r}; valid: {list(VARIANTS)}")
    loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "tokens": size.tokens, "vocab": size.vocab, "hidden": size.hidden,
            "peak_extra_bytes": max(peak - baseline, 0), "seconds": seconds}


def _loss(student_logprobs, teacher_logprobs, student_topk, teacher_topk, topk_forward_kl):
    advantage = (teacher_logprobs - student_logprobs).detach()
    k1_policy_gradient = -(advantage * student_logprobs).mean()
    return k1_policy_gradient + topk_forward_kl(student_topk, teacher_topk).mean()


def measure(variant: str, size: MemorySize, timeout: float) -> dict:
    """Run one variant in a fresh interpreter; a failure (OOM, missing package) is reported, never hidden."""
    result = run_in_subprocess("opd.bench.memory", variant, str(size.tokens), str(size.vocab), str(size.hidden),
                               timeout=timeout,
                               env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    return {"variant": variant, "tokens": size.tokens, **result}


def benchmark(sizes, variants=VARIANTS, timeout: float = 1800.0) -> list[dict]:
    return [measure(variant, size, timeout) for size in sizes for variant in variants]


def format_table(rows: list[dict]) -> str:
    """Markdown table with ratios against `naive` at the same size."""
    lines = ["| tokens | vocab | variant | peak extra MiB | seconds | memory / naive | time / naive |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    by_size: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_size.setdefault(row["tokens"], {})[row["variant"]] = row
    for tokens, variants in by_size.items():
        naive = variants.get("naive")
        for name, row in variants.items():
            if "error" in row:
                lines.append(f"| {tokens} | | {name} | not measured: {row['error']} | | | |")
                continue
            mib = row["peak_extra_bytes"] / 2**20
            ratio_memory = ratio_time = "n/a (naive not measured)"
            if naive and "error" not in naive:
                ratio_memory = f"{row['peak_extra_bytes'] / max(naive['peak_extra_bytes'], 1):.3f}"
                ratio_time = f"{row['seconds'] / naive['seconds']:.2f}"
            lines.append(f"| {tokens} | {row['vocab']} | {name} | {mib:.0f} | {row['seconds']:.2f} | "
                         f"{ratio_memory} | {ratio_time} |")
    return "\n".join(lines)


if __name__ == "__main__":
    variant, tokens, vocab, hidden = sys.argv[1], *map(int, sys.argv[2:5])
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(json.dumps(run_variant(variant, MemorySize(tokens=tokens, vocab=vocab, hidden=hidden))))
