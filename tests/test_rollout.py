"""HF-generate rollouts: sampler log-probs, end-of-sequence handling, and the checkpoint-defaults trap."""

from __future__ import annotations

import dataclasses
import os
import pytest
import torch
from transformers import GenerationConfig

from opd.runtime.models import end_of_sequence_ids, load_model, load_tokenizer, render_prompt
from opd.rollout.batch import SamplingSettings, left_pad, response_mask_until_end, sample_batch
from opd.rollout.hf import HfSampler
from opd.scoring import output_head, response_hidden_states, teacher_token_scores


@pytest.fixture(scope="module")
def student(model_dir):
    return load_model(str(model_dir / "student")), load_tokenizer(str(model_dir / "student"))


def settings_for(model, tokenizer, **overrides):
    values = dict(samples_per_prompt=2, temperature=0.7, top_p=1.0, max_new_tokens=10, batch_size=3,
                  end_of_sequence_ids=end_of_sequence_ids(model, tokenizer), pad_id=tokenizer.pad_token_id)
    values.update(overrides)
    return SamplingSettings(**values)


def rollout(model, prompt_ids, indices, domains, settings):
    """`samples_per_prompt` responses per prompt, as the training step's collect draws them."""
    def repeat(items):
        return [item for item in items for _ in range(settings.samples_per_prompt)]

    return sample_batch(HfSampler(model), repeat(prompt_ids), repeat(indices), repeat(domains), settings, step=0)


def prompts(tokenizer):
    texts = ["what is 12 + 7?", "hello", "count the letters in hello world please"]
    return [render_prompt(tokenizer, text, "chat") for text in texts]


def rescore(model, batch, temperature):
    hidden = response_hidden_states(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    weight, bias = output_head(model)
    mask = batch.response_mask
    logprobs, _, _, _ = teacher_token_scores(hidden[mask], weight, bias, batch.response_ids[mask], temperature=temperature)
    return logprobs, batch.sampler_logprobs[mask]


def test_sampler_logprobs_equal_the_scorers_at_the_sampling_temperature(student):
    model, tokenizer = student
    torch.manual_seed(0)
    batch = rollout(model, prompts(tokenizer), [0, 1, 2], ["a", "a", "b"], settings_for(model, tokenizer))
    assert batch.num_rows == 6 and batch.prompt_index == (0, 0, 1, 1, 2, 2)
    scored, recorded = rescore(model, batch, 0.7)
    torch.testing.assert_close(recorded, scored, atol=1e-5, rtol=1e-5)  # left padding handled like generate


def test_top_p_logprobs_are_of_the_truncated_distribution(student):
    model, tokenizer = student
    torch.manual_seed(0)
    batch = rollout(model, prompts(tokenizer), [0, 1, 2], ["a"] * 3, settings_for(model, tokenizer, top_p=0.5))
    scored, recorded = rescore(model, batch, 0.7)
    assert (recorded >= scored - 1e-6).all() and (recorded > scored + 1e-3).any()  # renormalised mass


def test_checkpoint_generation_defaults_do_not_leak_into_sampling(model_dir, tmp_path, student):
    """A folder whose generation_config says greedy top_k=1 must still be sampled with our settings."""
    model, tokenizer = student
    model.generation_config = GenerationConfig(do_sample=False, top_k=1, temperature=0.01, eos_token_id=1)
    try:
        torch.manual_seed(0)
        batch = rollout(model, prompts(tokenizer)[:1] * 4, [0] * 4, ["a"] * 4,
                        settings_for(model, tokenizer, samples_per_prompt=1))
        distinct = {tuple(row.tolist()) for row in batch.response_ids}
        assert len(distinct) > 1  # greedy would give 4 identical rows
    finally:
        model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id)


def test_rollouts_are_the_tokens_of_plain_generate_and_ordinary_tensors(student):
    """generate runs in inference mode (faster): the same tokens as HF generate under no_grad, returned as
    tensors that training may modify in place and save for backward."""
    from opd.rollout.hf import generate_responses

    model, tokenizer = student
    settings = settings_for(model, tokenizer, temperature=1.0)
    ids, mask = left_pad(prompts(tokenizer), tokenizer.pad_token_id)
    torch.manual_seed(3)
    responses = generate_responses(model, prompts(tokenizer), settings)
    torch.manual_seed(3)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask.long(), generation_config=GenerationConfig(
            do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=settings.max_new_tokens,
            eos_token_id=list(settings.end_of_sequence_ids), pad_token_id=settings.pad_id))
    generated = plain[:, ids.shape[1]:]
    assert torch.equal(responses.ids[:, :generated.shape[1]][responses.mask], generated[responses.mask])
    fields = (responses.ids, responses.mask, responses.logprobs, responses.entropy, responses.truncated,
              responses.from_teacher)
    assert not any(field.is_inference() for field in fields)
    weight = torch.ones((), requires_grad=True)
    (responses.logprobs.exp() * weight).sum().backward()  # an inference tensor cannot be saved for backward
    responses.ids[0, 0] = 0  # nor modified in place outside inference mode


def test_response_mask_stops_after_the_first_end_token():
    ids = torch.tensor([[5, 6, 1, 7, 1], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    mask, truncated = response_mask_until_end(ids, (1, 2))
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5, [True, False, False, False, False]]
    assert truncated.tolist() == [False, True, False]


def test_end_token_rows_are_padded_and_masked(student):
    model, tokenizer = student
    eos = tokenizer.eos_token_id
    # Make EOS overwhelmingly likely so responses end early and unequally.
    head = model.get_output_embeddings()
    original = head.weight.data[eos].clone()
    head.weight.data[eos] = head.weight.data.mean(0) + 0.3 * head.weight.data.std()
    try:
        torch.manual_seed(1)
        batch = rollout(model, prompts(tokenizer), [0, 1, 2], ["a"] * 3, settings_for(model, tokenizer, max_new_tokens=12))
    finally:
        head.weight.data[eos] = original
    lengths = batch.response_mask.sum(1)
    ended = ~batch.truncated
    assert ended.any()
    for row in range(batch.num_rows):
        n = int(lengths[row])
        if ended[row]:
            assert batch.response_ids[row, n - 1] == eos
        assert (batch.response_ids[row, n:] == tokenizer.pad_token_id).all()
        assert (batch.sampler_logprobs[row, n:] == 0).all()


def test_left_pad():
    ids, mask = left_pad([[1, 2], [3]], pad_id=0)
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[True, True], [False, True]]


def test_unsupported_output_heads_are_refused(student):
    model, _ = student
    model.config.final_logit_softcapping = 30.0
    try:
        with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
            output_head(model)
    finally:
        model.config.final_logit_softcapping = None


def test_sampler_entropy_is_the_students_entropy(student):
    """student/entropy is logged from the sampler's record: it must equal the full-vocabulary entropy."""
    model, tokenizer = student
    torch.manual_seed(0)
    batch = rollout(model, prompts(tokenizer), [0, 1, 2], ["a"] * 3, settings_for(model, tokenizer))
    hidden = response_hidden_states(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    weight, bias = output_head(model)
    mask = batch.response_mask
    _, _, _, entropy = teacher_token_scores(hidden[mask], weight, bias, batch.response_ids[mask], temperature=0.7,
                                            with_entropy=True)
    torch.testing.assert_close(batch.sampler_entropy[mask], entropy, atol=1e-5, rtol=1e-5)
    ranks = batch.entropy_rank[mask]
    assert ranks.min() == 0 and ranks.max() == 1
    order = batch.sampler_entropy[mask].argsort(stable=True)
    assert (ranks[order].diff() > 0).all()  # ranks increase with entropy


def test_vllm_logging_is_quiet_unless_asked_for(monkeypatch):
    from opd.rollout.vllm import prepare_environment

    for name in ("VLLM_LOGGING_LEVEL", "OPD_VLLM_LOG", "VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    prepare_environment()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR"
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    monkeypatch.setenv("OPD_VLLM_LOG", "1")
    prepare_environment()
    assert "VLLM_LOGGING_LEVEL" not in os.environ  # vLLM's own default
    monkeypatch.setenv("OPD_VLLM_LOG", "0")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    prepare_environment()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"  # the user's own setting is kept


def test_shared_noise_draws_each_token_from_the_tempered_distribution():
    """Gumbel-max with the hashed uniforms: over many rows, the argmax lands on each token with its
    probability under softmax(scores) (the chooser adds noise to already tempered scores)."""
    from opd.rollout.hf import shared_noise_chooser

    scores = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))[None, :].repeat(40_000, 1)
    frequencies = []
    for position in (0, 1):  # a second position draws afresh
        chosen = shared_noise_chooser(seed=11, first_row=0)(scores.clone(), torch.arange(40_000), position)
        frequencies.append(torch.bincount(chosen, minlength=5).double() / 40_000)
    for observed in frequencies:
        torch.testing.assert_close(observed, scores[0].double().exp(), atol=0.008, rtol=0)
    # Different positions, rows and seeds draw differently (the noise is not one fixed vector).
    assert not torch.equal(frequencies[0], frequencies[1])


def test_shared_noise_gives_a_row_the_same_tokens_whatever_the_batch(student):
    """A row's tokens depend on the seed, its index and the model only: split into other generate calls,
    asked again after other sampling, they are the same; its recorded log-probs are the model's own."""
    from opd.rollout.hf import sample_in_batches

    model, tokenizer = student
    rows = [p for p in prompts(tokenizer) for _ in range(4)]  # 12 rows
    settings = settings_for(model, tokenizer, temperature=1.0, max_new_tokens=12)
    whole = sample_in_batches(model, rows, dataclasses.replace(settings, batch_size=12), shared_noise_seed=5)
    torch.manual_seed(123)  # the global generator plays no part
    split = sample_in_batches(model, rows, dataclasses.replace(settings, batch_size=5), shared_noise_seed=5)
    width = whole.ids.shape[1]
    assert torch.equal(whole.mask, split.mask[:, :width]) and torch.equal(whole.ids[whole.mask], split.ids[split.mask])
    other = sample_in_batches(model, rows, settings, shared_noise_seed=6)
    assert not torch.equal(other.ids[:, :4], whole.ids[:, :4])
    # Four samples of one prompt draw with different noise, so they are not copies of each other.
    assert len({tuple(whole.ids[row][whole.mask[row]].tolist()) for row in range(4)}) > 1
    prompt_ids, prompt_mask = left_pad(rows, tokenizer.pad_token_id)
    batch = type("Batch", (), dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=whole.ids,
                                   response_mask=whole.mask, sampler_logprobs=whole.logprobs))
    scored, recorded = rescore(model, batch, 1.0)
    torch.testing.assert_close(recorded, scored, atol=1e-5, rtol=1e-5)


def test_rollout_shared_noise_couples_two_students_at_one_step_seed(student):
    """rollout.shared_noise: the step's rollout seed keys the noise, so a slightly different student asked at
    the same seed draws nearly the same tokens, where independent draws agree far less; a step without a
    seed is refused rather than sampled some other way."""
    import copy

    model, tokenizer = student
    rows = [p for p in prompts(tokenizer) for _ in range(4)]
    settings = dataclasses.replace(settings_for(model, tokenizer, temperature=1.0, max_new_tokens=12), seed=11)
    nearby = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in nearby.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-3 * parameter.std().nan_to_num())

    def agreement(shared):
        torch.manual_seed(0)
        first = HfSampler(model, shared_noise=shared).sample(rows, settings)
        torch.manual_seed(1)  # independent draws where the noise is torch's
        second = HfSampler(nearby, shared_noise=shared).sample(rows, settings)
        width = min(first.ids.shape[1], second.ids.shape[1])
        return (first.ids[:, :width] == second.ids[:, :width]).float().mean().item()

    coupled, independent = agreement(True), agreement(False)
    assert coupled > 0.9 and coupled > independent + 0.3, (coupled, independent)
    with pytest.raises(ValueError, match="rollout.shared_noise needs the step's rollout seed"):
        HfSampler(model, shared_noise=True).sample(rows, dataclasses.replace(settings, seed=None))
