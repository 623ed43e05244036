"""vLLM rollouts and teacher scoring, against independent float32 Hugging Face references.

One engine serves the whole module (single process, 64 MiB of KV cache). The models have head_dim 32
(vLLM's CPU attention has no kernel for 16, the other tests' size) and initializer_range 0.2, so that
distributions are peaked enough for a wrong log-prob to show.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import TopPLogitsWarper

pytest.importorskip("vllm")

from opd.runtime.models import end_of_sequence_ids, load_model, load_tokenizer, render_prompt  # noqa: E402
from opd.rollout.batch import SamplingSettings, build_batch  # noqa: E402
from opd.rollout.vllm import EngineSettings, VllmEngine, policy_weights  # noqa: E402
from opd.scoring import output_head, response_hidden_states, teacher_token_scores  # noqa: E402
from opd.teachers import DomainScorer, HfScorer, ScoringSettings, score_batch  # noqa: E402
from opd.runtime.tiny import build_model, build_tokenizer  # noqa: E402

TOLERANCE = 1e-3  # the bar; measured differences are ~1e-5 (float32 on both sides)
BLOCK = 128  # vLLM's CPU KV-cache block: only prompts of a full block or more hit the prefix cache


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    tokenizer = build_tokenizer(root / "student")
    build_model(root / "student", tokenizer, hidden_size=64, num_layers=2, num_heads=2, seed=0, initializer_range=0.2)
    return root / "student"


ENVIRONMENT_BEFORE: dict[str, str] = {}


@pytest.fixture(scope="module")
def engine(folder):
    ENVIRONMENT_BEFORE.update(os.environ)
    engine = VllmEngine(EngineSettings(model_path=str(folder), dtype="float32", kv_cache_bytes=64 * 2**20,
                                       max_model_len=512, enforce_eager=True, seed=0, max_logprobs=5))
    yield engine
    engine.close()


def test_building_an_engine_leaves_the_environment_and_thread_control_alone(engine):
    """vLLM sets LD_PRELOAD, LD_LIBRARY_PATH, LOCAL_WORLD_SIZE, ... and disables torch.set_num_threads: later
    subprocesses and training must not inherit that. Only the three documented variables may be added
    (rollout/vllm.py's prepare_environment: its thread and process settings, and its quiet logging)."""
    changed = {k for k in set(os.environ) | set(ENVIRONMENT_BEFORE) if os.environ.get(k) != ENVIRONMENT_BEFORE.get(k)}
    assert changed - {"PYTEST_CURRENT_TEST"} <= {"OMP_NUM_THREADS", "VLLM_ENABLE_V1_MULTIPROCESSING",
                                                  "VLLM_LOGGING_LEVEL"}, changed
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def student(folder):
    return load_model(str(folder)), load_tokenizer(str(folder))


def settings_for(model, tokenizer, **overrides) -> SamplingSettings:
    values = dict(samples_per_prompt=2, temperature=1.0, top_p=1.0, max_new_tokens=12, batch_size=8,
                  end_of_sequence_ids=end_of_sequence_ids(model, tokenizer), pad_id=tokenizer.pad_token_id)
    return SamplingSettings(**{**values, **overrides})


def short_prompts(tokenizer) -> list[list[int]]:
    return [render_prompt(tokenizer, text, "chat") for text in ["what is 12 + 7?", "hello", "count the letters"]]


def long_prompt(tokenizer) -> list[int]:
    ids = render_prompt(tokenizer, "the quick brown fox jumps over the lazy dog. " * 12, "chat")
    assert len(ids) > BLOCK + 20  # past a full cache block, or the prefix cache is never used
    return ids


@torch.no_grad()
def reference_logprobs(model, prompt: list[int], response: list[int], temperature=1.0, top_p=1.0) -> torch.Tensor:
    """log pi(response_t | prompt, response_<t) from one plain float32 forward, after temperature and
    top-p as transformers' warpers apply them (the semantics rollout.py's HF recorder records)."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + len(response) - 1].float() / temperature
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p=top_p)(ids, logits)
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


def sampled_rows(responses, row_count):
    """(row, response ids, sampler log-probs) of the student-sampled tokens of each row."""
    for row in range(row_count):
        sampled = responses.mask[row] & ~responses.from_teacher[row]
        yield row, responses.ids[row][responses.mask[row]].tolist(), responses.logprobs[row][sampled]


def test_sampler_scorer_and_hf_logprobs_agree(engine, student):
    """The issue's parity bar: the vLLM sampler, the vLLM teacher scorer and opd's HF scorer give the same
    log-probs for the same tokens (float32, temperature 1), and the scorer's top-k is HF's top-k."""
    model, tokenizer = student
    prompts = [p for p in short_prompts(tokenizer) for _ in range(2)]
    responses = engine.sample(prompts, settings_for(model, tokenizer))
    assert responses.entropy is None  # vLLM reports none; the training forward computes the student's
    rows = [r for _, r, _ in sampled_rows(responses, len(prompts))]
    assert len({tuple(r) for r in rows}) > 1 and all(len(r) > 0 for r in rows)
    scored = engine.score_responses(prompts, rows, topk=5)
    batch = build_batch(prompts, list(range(len(prompts))), ["a"] * len(prompts), responses,
                        settings_for(model, tokenizer), step=0)
    hidden = response_hidden_states(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    weight, bias = output_head(model)
    opd_scores, _, _, _ = teacher_token_scores(hidden[batch.response_mask], weight, bias,
                                               batch.response_ids[batch.response_mask])
    torch.testing.assert_close(batch.sampler_logprobs[batch.response_mask], opd_scores, atol=TOLERANCE, rtol=0)
    for (row, response, sampler), scores in zip(sampled_rows(responses, len(prompts)), scored, strict=True):
        reference = reference_logprobs(model, prompts[row], response)
        torch.testing.assert_close(sampler, reference, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(scores.logprobs, reference, atol=TOLERANCE, rtol=0)
        with torch.no_grad():
            ids = torch.tensor([prompts[row] + response])
            logits = model(input_ids=ids).logits[0, len(prompts[row]) - 1 : -1]
        top = torch.log_softmax(logits, dim=-1).topk(5, dim=-1)
        torch.testing.assert_close(scores.topk_logprobs, top.values, atol=TOLERANCE, rtol=0)
        assert (scores.topk_ids == top.indices.int()).float().mean() > 0.95  # near-ties may swap places


def test_sampler_logprobs_are_of_the_temperature_and_top_p_distribution(engine, student):
    """lOld must be the log-prob under what was sampled from (vLLM's processed_logprobs), as with HF: raw
    log-probs (vLLM's default) would be off by the temperature and the top-p renormalisation."""
    model, tokenizer = student
    prompts = short_prompts(tokenizer)
    responses = engine.sample(prompts, settings_for(model, tokenizer, temperature=0.7, top_p=0.8))
    raw_differs = False
    for row, response, sampler in sampled_rows(responses, len(prompts)):
        expected = reference_logprobs(model, prompts[row], response, temperature=0.7, top_p=0.8)
        torch.testing.assert_close(sampler, expected, atol=TOLERANCE, rtol=0)
        raw_differs |= bool((sampler - reference_logprobs(model, prompts[row], response)).abs().max() > 0.05)
    assert raw_differs


def test_teacher_prefixes_are_continued_and_flagged(engine, student):
    model, tokenizer = student
    prompts = short_prompts(tokenizer)
    prefixes = [[], tokenizer("the quick", add_special_tokens=False)["input_ids"], list(range(40, 52))]
    settings = settings_for(model, tokenizer)
    responses = engine.sample(prompts, settings, prefixes)
    for row, prefix in enumerate(prefixes):
        take = min(len(prefix), settings.max_new_tokens)
        assert responses.ids[row, :take].tolist() == prefix[:take]
        assert responses.from_teacher[row, :take].all() and not responses.from_teacher[row, take:].any()
        assert (responses.logprobs[row, :take] == 0).all()
    row, prefix = 1, prefixes[1]
    continuation = responses.ids[row][responses.mask[row]].tolist()[len(prefix):]
    expected = reference_logprobs(model, prompts[row] + prefix, continuation)
    torch.testing.assert_close(responses.logprobs[row][len(prefix) : len(prefix) + len(continuation)], expected,
                               atol=TOLERANCE, rtol=0)


def test_vllm_teacher_scores_equal_the_hf_teachers_in_score_batch(engine, student):
    model, tokenizer = student
    prompts = short_prompts(tokenizer)
    settings = settings_for(model, tokenizer)
    batch = build_batch(prompts, [0, 1, 2], ["a"] * 3, engine.sample(prompts, settings), settings, step=0)
    scoring = ScoringSettings(topk=4, rows_per_forward=2, logprob_floor=-30.0, need_reference=False)
    hf_teacher = HfScorer(model, temperature=1.0, chunk_size=64)
    by_engine = score_batch(batch, {"a": DomainScorer(domain="a", teacher=engine, reference=None)}, scoring)
    by_model = score_batch(batch, {"a": DomainScorer(domain="a", teacher=hf_teacher, reference=None)}, scoring)
    torch.testing.assert_close(by_engine.logprobs, by_model.logprobs, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(by_engine.topk_logprobs, by_model.topk_logprobs, atol=TOLERANCE, rtol=0)


def test_lora_weights_are_synced_merged(folder):
    """policy_weights of a peft student = the merged model's weights, by the names vLLM loads."""
    from peft import LoraConfig, get_peft_model

    base = load_model(str(folder), trainable=True)
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)  # B starts at zero: make the adapters matter
    weights = dict(policy_weights(adapted))
    merged = copy.deepcopy(adapted).merge_and_unload().state_dict()
    assert set(weights) == set(merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=0)
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"],
                           load_model(str(folder)).state_dict()["model.layers.0.self_attn.q_proj.weight"])


def test_after_an_optimizer_step_and_sync_vllm_samples_from_the_updated_model(engine, student):
    """Also shows why every sync resets the prefix cache: with the new weights loaded but the cache kept,
    a prompt longer than one KV block reuses the old weights' attention state."""
    model, tokenizer = student
    trained = copy.deepcopy(model).train().requires_grad_(True)
    long = long_prompt(tokenizer)
    settings = settings_for(model, tokenizer, samples_per_prompt=1, max_new_tokens=8)
    engine.sample([long], settings)  # the old weights' KV blocks of this prompt are now cached
    optimizer = torch.optim.AdamW(trained.parameters(), lr=0.05)
    loss = -torch.log_softmax(trained(input_ids=torch.tensor([long])).logits[0, :-1], -1).gather(
        1, torch.tensor(long[1:])[:, None]).mean()
    loss.backward()
    optimizer.step()
    trained.eval()
    try:
        engine.load_weights(policy_weights(trained))  # no reset yet
        row, response, stale = next(sampled_rows(engine.sample([long], settings), 1))
        assert (stale - reference_logprobs(trained, long, response)).abs().max() > 0.05
        engine.reset_prefix_cache()
        for prompt in [long, *short_prompts(tokenizer)]:
            _, response, fresh = next(sampled_rows(engine.sample([prompt], settings), 1))
            torch.testing.assert_close(fresh, reference_logprobs(trained, prompt, response), atol=TOLERANCE, rtol=0)
        # sync = load + reset, in one call (what train() does after every optimizer step)
        engine.sync(model)
        _, response, fresh = next(sampled_rows(engine.sample([long], settings), 1))
        torch.testing.assert_close(fresh, reference_logprobs(model, long, response), atol=TOLERANCE, rtol=0)
    finally:
        engine.sync(model)


def test_a_head_size_vllm_cannot_run_on_the_cpu_is_refused_before_the_engine_is_built(tmp_path):
    # head_dim 16 builds an engine and then fails at the first request ("Unsupported CPU attention
    # configuration"), i.e. mid-run; the check names the model and the way out instead.
    tokenizer = build_tokenizer(tmp_path / "small_heads")
    build_model(tmp_path / "small_heads", tokenizer, hidden_size=64, num_layers=1, num_heads=4, seed=0)
    with pytest.raises(ValueError, match=r"small_heads: head_dim 16 has no vLLM CPU attention kernel"):
        VllmEngine(EngineSettings(model_path=str(tmp_path / "small_heads"), dtype="float32", kv_cache_bytes=2**20,
                                  max_model_len=64, enforce_eager=True, seed=0, max_logprobs=1))
