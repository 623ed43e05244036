"""Packed (padding-free) forwards against the padded ones, and token-budget micro-batches (packing.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_config

from opd.assemble import StepSettings, assemble, seed_everything
from opd.collect import collect
from opd.packing import token_budget_slices
from opd.runtime.tiny import build_model, build_tokenizer
from opd.scoring import response_hidden_states
from opd.teachers import score_batch
from opd.train import accumulate_gradients


@pytest.fixture(scope="module")
def float64_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packing")
    tokenizer = build_tokenizer(folder)
    model = build_model(folder, tokenizer, hidden_size=32, num_layers=2, seed=0, initializer_range=0.2)
    return model.double()


def _rows(lengths_prompt, lengths_response, vocab, seed=0):
    """Left-padded prompts and right-padded responses of the given real lengths."""
    generator = torch.Generator().manual_seed(seed)
    width_p, width_t, n = max(lengths_prompt), max(lengths_response), len(lengths_prompt)
    prompt_ids = torch.randint(vocab, (n, width_p), generator=generator)
    response_ids = torch.randint(vocab, (n, width_t), generator=generator)
    prompt_mask = torch.arange(width_p)[None] >= (width_p - torch.tensor(lengths_prompt))[:, None]
    response_mask = torch.arange(width_t)[None] < torch.tensor(lengths_response)[:, None]
    return prompt_ids, prompt_mask, response_ids, response_mask


def test_packed_forward_equals_padded_in_values_and_gradients(float64_model):
    model = float64_model
    rows = _rows([3, 9, 1, 5], [17, 1, 6, 2], model.config.vocab_size)
    mask = rows[3]
    upstream = torch.randn(int(mask.sum()), model.config.hidden_size, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1))
    results = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        hidden = response_hidden_states(model, *rows, packed=packed)
        (hidden[mask] * upstream).sum().backward()
        results.append((hidden[mask].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (padded, padded_grads), (packed, packed_grads) = results
    torch.testing.assert_close(packed, padded, rtol=1e-10, atol=1e-10)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-9, atol=1e-10)


def test_token_budget_slices_fill_greedily_and_give_a_long_row_its_own():
    assert token_budget_slices([3, 4, 2, 9, 1, 1], budget=7) == [slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 6)]
    assert token_budget_slices([20], budget=7) == [slice(0, 1)]


@pytest.fixture(scope="module")
def float64_run(model_dir, prompts_file, tmp_path_factory):
    config = make_config(model_dir, prompts_file, tmp_path_factory.mktemp("run") / "run",
                         rollout={"prompts_per_step": 4})
    seed_everything(0)
    run = assemble(config)
    run.student.double()
    batch = collect(run, 0, [0, 1, 2, 3], {})
    # Responses of very different lengths (a random tiny model rarely samples EOS): cut each row's mask.
    lengths = torch.tensor([8, 1, 5, 1, 8, 2, 1, 7])
    batch = dataclasses.replace(batch, response_mask=torch.arange(8)[None, :] < lengths[:, None])
    scores = score_batch(batch, run.scorers, run.scoring)
    return run, batch, scores


def _gradients(run, batch, scores, **settings):
    run.student.zero_grad(set_to_none=True)
    step = StepSettings(aggregation="token-mean", temperature=1.0, chunk_size=7, max_grad_norm=None,
                        **{"micro_batch_size": 8, **settings})
    accumulate_gradients(run.student, batch, scores, run.objective, step)
    return {n: p.grad.clone() for n, p in run.student.named_parameters()}


def test_a_packed_training_step_has_the_padded_steps_gradient(float64_run):
    padded = _gradients(*float64_run, micro_batch_size=3)
    packed = _gradients(*float64_run, micro_batch_size=3, packed=True)
    for name, grad in padded.items():
        torch.testing.assert_close(packed[name], grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_micro_batches_give_the_row_micro_batches_gradient(float64_run, packed):
    rows = _gradients(*float64_run, micro_batch_size=8, packed=packed)
    budget = _gradients(*float64_run, micro_batch_tokens=20, packed=packed)
    for name, grad in rows.items():
        torch.testing.assert_close(budget[name], grad, rtol=1e-9, atol=1e-12)


def test_a_packed_teacher_scores_what_the_padded_one_does(float64_run):
    from opd.teachers import HfScorer
    from opd.types import ScoreRequest

    run, batch, _ = float64_run
    request = ScoreRequest(prompt_ids=batch.prompt_ids, prompt_mask=batch.prompt_mask,
                           response_ids=batch.response_ids, response_mask=batch.response_mask, topk=3)
    padded, packed = (HfScorer(run.student, temperature=1.0, chunk_size=5, packed=p).score(request)
                      for p in (False, True))
    torch.testing.assert_close(packed.logprobs, padded.logprobs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed.topk_logprobs, padded.topk_logprobs, rtol=1e-10, atol=1e-10)
