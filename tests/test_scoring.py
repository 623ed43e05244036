"""The chunked scorer against an unchunked float64 reference, and its memory bound (algorithms §6)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from opd.scoring import scatter_tokens, student_token_logprobs, student_token_scores, teacher_token_scores


def inputs(num_tokens=37, hidden=8, vocab=50, k=5, seed=0, bias=True):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, generator=generator, dtype=torch.float64, requires_grad=True) if bias else None
    targets = torch.randint(0, vocab, (num_tokens,), generator=generator)
    gather = torch.randint(0, vocab, (num_tokens, k), generator=generator, dtype=torch.int32)
    return h, w, b, targets, gather


@pytest.mark.parametrize("chunk_size", [1, 6, 37, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("bias", [True, False])
def test_student_logprobs_match_full_vocabulary_reference(chunk_size, temperature, bias):
    h, w, b, targets, gather = inputs(bias=bias)
    logprobs, gathered, entropy = student_token_logprobs(h, w, b, targets, gather, temperature=temperature,
                                                         chunk_size=chunk_size)
    generator = torch.Generator().manual_seed(9)
    upstream_a = torch.randn(logprobs.shape, generator=generator, dtype=torch.float64)
    upstream_b = torch.randn(gathered.shape, generator=generator, dtype=torch.float64)
    ((logprobs * upstream_a).sum() + (gathered * upstream_b).sum()).backward()
    grads = [t.grad.clone() for t in (h, w, b) if t is not None]

    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_() if b is not None else None
    full = torch.log_softmax((h2 @ w2.T + (b2 if b2 is not None else 0)) / temperature, dim=-1)  # [M, V]
    reference_logprobs = full.gather(1, targets[:, None]).squeeze(1)
    reference_gathered = full.gather(1, gather.long())
    reference_entropy = -(full.exp() * full).sum(-1)
    ((reference_logprobs * upstream_a).sum() + (reference_gathered * upstream_b).sum()).backward()
    torch.testing.assert_close(logprobs, reference_logprobs)
    torch.testing.assert_close(gathered, reference_gathered)
    torch.testing.assert_close(entropy, reference_entropy.detach())
    assert not entropy.requires_grad
    for mine, theirs in zip(grads, [t.grad for t in (h2, w2, b2) if t is not None]):
        torch.testing.assert_close(mine, theirs)


def test_student_logprobs_without_gather_and_gradcheck():
    h, w, b, targets, _ = inputs(num_tokens=6, hidden=3, vocab=7)
    assert torch.autograd.gradcheck(
        lambda h_, w_, b_: student_token_logprobs(h_, w_, b_, targets, None, temperature=0.8, chunk_size=4)[0],
        (h, w, b),
    )
    _, gathered, _ = student_token_logprobs(h, w, b, targets, None)
    assert gathered is None


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_teacher_scores_match_reference(chunk_size):
    h, w, b, targets, _ = inputs()
    logprobs, topk_ids, topk_logprobs, _ = teacher_token_scores(h.detach(), w.detach(), b.detach(), targets, topk=6,
                                                             temperature=0.7, chunk_size=chunk_size)
    full = torch.log_softmax((h @ w.T + b).detach() / 0.7, dim=-1)
    torch.testing.assert_close(logprobs, full.gather(1, targets[:, None]).squeeze(1))
    values, indices = full.topk(6, dim=-1)
    torch.testing.assert_close(topk_logprobs, values)
    assert topk_ids.dtype == torch.int32 and torch.equal(topk_ids.long(), indices)


def test_scorer_rejects_bad_settings():
    h, w, b, targets, _ = inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        student_token_logprobs(h, w, b, targets, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        teacher_token_scores(h, w, b, targets, temperature=0.0)


def test_scatter_tokens_places_values_at_mask():
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, False]])
    values = torch.arange(4.0)
    out = scatter_tokens(values, mask, fill=-1.0)
    assert out.tolist() == [[0.0, -1.0, 1.0], [-1.0, -1.0, -1.0], [2.0, 3.0, -1.0]]


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from opd.scoring import student_token_logprobs, teacher_token_scores
    torch.set_num_threads(1)
    tokens, vocab, hidden, chunk, mode = int(sys.argv[1]), int(sys.argv[2]), 64, 256, sys.argv[3]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    ids = torch.randint(0, vocab, (tokens, 64), generator=g, dtype=torch.int32)
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    def high_water():
        # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across exec, so a
        # large parent (a pytest process that has loaded vLLM) would hide the probe's own peak.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    before = rss()
    peak_before = high_water()
    if mode == "chunked":
        teacher_token_scores(h.detach(), w.detach(), None, targets, topk=64, chunk_size=chunk)
        lp, gathered, _ = student_token_logprobs(h, w, None, targets, ids, chunk_size=chunk)
        (lp.sum() + gathered.sum()).backward()
    else:
        full = torch.log_softmax(h @ w.T, dim=-1)
        (full.gather(1, targets[:, None]).sum() + full.gather(1, ids.long()).sum()).backward()
    peak = high_water()
    print(json.dumps({"extra": peak - max(before, peak_before) if peak > peak_before else 0, "before": before}))
    """
)


def peak_extra_bytes(tokens: int, vocab: int, mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tokens), str(vocab), mode],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)["extra"]


def test_scorer_peak_memory_does_not_scale_with_tokens_times_vocabulary():
    vocab = 32_768
    small, large = peak_extra_bytes(1024, vocab, "chunked"), peak_extra_bytes(8192, vocab, "chunked")
    full_logits_large = 8192 * vocab * 4  # one float32 [tokens, vocab] tensor: 1 GiB
    naive = peak_extra_bytes(2048, vocab, "naive")
    # Chunked: bounded by a few [chunk, V] buffers plus O(tokens * (hidden + k)) outputs and gradients.
    assert large < full_logits_large / 8, (small, large)
    assert large - small < full_logits_large / 16, (small, large)  # 4x the tokens, (nearly) no growth
    assert naive > 2048 * vocab * 4, naive  # the probe does see [tokens, vocab] allocations


def test_student_token_scores_return_the_students_own_topk():
    """The student's own top-k ids (the top-k overlap metric) equal the full-vocabulary top-k, chunked."""
    h, w, b, targets, gather = inputs()
    _, _, _, own = student_token_scores(h, w, b, targets, gather, temperature=0.8, chunk_size=6, with_own_topk=True)
    full = torch.log_softmax((h @ w.T + b).detach() / 0.8, dim=-1)
    assert torch.equal(own.long(), full.topk(gather.shape[1], dim=-1).indices) and not own.requires_grad
    assert student_token_scores(h, w, b, targets, gather)[3] is None
