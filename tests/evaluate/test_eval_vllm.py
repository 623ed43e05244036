"""`opd eval --backend vllm` against the HF path: the same distribution (log-probs of the sampled tokens
against an independent HF forward, 1e-3), the same avg@k up to binomial noise, the same results format,
and a cache per backend.

One vLLM engine serves the module. The model has head_dim 32 (vLLM's CPU attention has no kernel for 16)
and initializer_range 0.2, so that distributions are peaked enough for a wrong log-prob to show.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")

from opd.evaluate.benchmarks import load_benchmark  # noqa: E402
from opd.evaluate.run import EvalSettings, evaluate  # noqa: E402
from opd.evaluate.sampling import EvalBackend, open_eval_sampler  # noqa: E402
from opd.rollout.batch import SamplingSettings  # noqa: E402
from opd.runtime.models import load_model  # noqa: E402
from opd.runtime.tiny import build_model, build_tokenizer  # noqa: E402

TOLERANCE = 1e-3
VLLM = EvalBackend(name="vllm", kv_cache_gib=1 / 16, max_model_len=1024)
BENCHMARK = "arc_challenge"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_vllm")
    tokenizer = build_tokenizer(root / "student")
    build_model(root / "student", tokenizer, hidden_size=64, num_layers=2, num_heads=2, seed=0, initializer_range=0.2)
    return str(root / "student")


@pytest.fixture(scope="module")
def problems():
    return load_benchmark(BENCHMARK)[:6]


@pytest.fixture(scope="module")
def engine(folder, problems):
    with open_eval_sampler(folder, VLLM, problems, max_new_tokens=16) as opened:
        yield opened


@torch.no_grad()
def forward_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) of each response token: one plain float32 forward."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
    logits = logits[len(prompt) - 1 : len(prompt) + len(response) - 1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_eval_samplers_record_the_logprobs_of_an_hf_forward(backend, engine, folder, problems):
    """Both evaluation samplers draw from the model's tempered distribution: the log-prob each records for
    the token it sampled equals an HF forward over the same tokens to 1e-3."""
    model = load_model(folder)
    temperature = 0.7
    settings = SamplingSettings(samples_per_prompt=1, temperature=temperature, top_p=1.0, max_new_tokens=16,
                                batch_size=8, end_of_sequence_ids=engine.end_of_sequence_ids,
                                pad_id=engine.tokenizer.pad_token_id)
    prompts = [engine.prompts[p.problem_id] for p in problems[:3] for _ in range(2)]
    if backend == "vllm":
        responses = engine.sampler.sample(prompts, settings)
    else:
        with open_eval_sampler(folder, EvalBackend(), problems, max_new_tokens=16) as opened:
            responses = opened.sampler.sample(prompts, settings)
    compared = 0
    for row, prompt in enumerate(prompts):
        response = responses.ids[row][responses.mask[row]].tolist()
        assert response, "every row samples at least one token"
        reference = forward_logprobs(model, prompt, response, temperature)
        torch.testing.assert_close(responses.logprobs[row][responses.mask[row]], reference, atol=TOLERANCE, rtol=0)
        compared += len(response)
    assert compared >= 12


def test_vllm_at_temperature_0_decodes_the_argmax(engine, folder, problems):
    """vLLM's temperature 0 is greedy: every row is the argmax decoding by hand of the HF model."""
    from support import argmax_decode

    model = load_model(folder)
    settings = SamplingSettings(samples_per_prompt=1, temperature=0.0, top_p=1.0, max_new_tokens=8, batch_size=8,
                                end_of_sequence_ids=engine.end_of_sequence_ids, pad_id=engine.tokenizer.pad_token_id)
    prompts = [engine.prompts[p.problem_id] for p in problems[:3]]
    responses = engine.sampler.sample(prompts, settings)
    for row, prompt in enumerate(prompts):
        expected = argmax_decode(model, prompt, 8, engine.end_of_sequence_ids)
        assert responses.ids[row][responses.mask[row]].tolist() == expected


def test_vllm_and_hf_evaluations_agree_within_binomial_noise(folder, tmp_path, monkeypatch, capfd):
    """avg@k of both backends on the same 30 problems x 8 samples: a two-proportion z-test at |z| < 3.3 (a
    false alarm once in ~1000 runs; a sampler off by 0.1 in its rate fails it), with the pooled rate away
    from 0 and 1 so that the test can fail; the same results format, the backend recorded, one cache file
    per backend, and progress lines on stderr without a terminal."""
    import opd.evaluate.run as run
    from support import holds_a_vowel, two_proportion_z

    monkeypatch.setattr(run, "grade_all", holds_a_vowel)
    settings = EvalSettings(samples=8, temperature=1.0, max_new_tokens=3, limit=30, batch_size=64)
    hf = evaluate([BENCHMARK], settings, str(tmp_path), model_dir=folder, backend=EvalBackend())
    vllm = evaluate([BENCHMARK], settings, str(tmp_path), model_dir=folder, backend=VLLM)
    total = 30 * 8
    correct = [round(r["benchmarks"][BENCHMARK]["avg_at_k"] * total) for r in (hf, vllm)]
    pooled = sum(correct) / (2 * total)
    assert 0.15 < pooled < 0.85, correct
    assert abs(two_proportion_z(*correct, total)) < 3.3, correct
    assert [r["settings"]["backend"] for r in (hf, vllm)] == ["hf", "vllm"]
    assert set(hf["benchmarks"][BENCHMARK]) == set(vllm["benchmarks"][BENCHMARK])
    assert len(list((tmp_path / "cache").glob(f"{BENCHMARK}-*.jsonl"))) == 2
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["backend"] == "vllm"
    assert f"opd eval: {BENCHMARK}: sampled {total}/{total}" in capfd.readouterr().err


def test_a_prompt_longer_than_the_engine_is_refused_before_it_is_built(folder, problems):
    with pytest.raises(ValueError, match="needs --max-model-len >= "):
        with open_eval_sampler(folder, EvalBackend(name="vllm", max_model_len=16), problems, max_new_tokens=8):
            pass
