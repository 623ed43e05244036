"""Start-up checks of a served model against the model it stands for (the student, a teacher, a reference),
before any step; and, after the student's first weight sync, that the servers sample from the student.

A server is asked only what its OpenAI-compatible endpoints answer, so each check is behavioural:

- reachable, with a context (`--max-model-len`) that holds a prompt, its response and the one token a
  scoring request generates;
- the same vocabulary: the server accepts the highest id of ours and refuses the next one (vLLM checks
  prompt ids against max(tokenizer size, model width));
- the same tokenizer and chat template: the server renders the first prompts of the data (its own chat
  template over `/tokenize`) and a probe text to exactly our ids;
- top-k log-probs as deep as the objective needs (`--max-logprobs`); for a student, the reload endpoint
  (`VLLM_SERVER_DEV_MODE=1`), and with sync nccl the weight-transfer endpoints;
- after the first sync: the server's log-prob of a probe sequence equals the student's (its weights arrived),
  and its sampled tokens' log-probs are those of the student at the sampling temperature (the server runs
  `--logprobs-mode processed_logprobs`), both within `probe_tolerance`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from opd.served.client import ServerClient, ServerRefused, ServerUnavailable

PROBE_TEXT = "The quick brown fox jumps over 13 lazy dogs: 2 + 2 = 4, naïve café, x**2 \n\t{ok}"


class ServedModelMismatch(ValueError):
    """A server that does not serve the model it stands for, or lacks what opd needs of it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ServedExpectation:
    """What a served model must agree with."""

    key: str  # the config key of the server, for messages
    tokenizer: object  # the model's tokenizer (the student's, or the teacher's own folder's)
    width: int  # the model's output width (logits per position)
    renderings: tuple[tuple[object, tuple[int, ...]], ...]  # (prompt: text or messages, our ids) per probe row
    prompt_format: str  # chat | raw
    required_length: int  # prompt + response + 1 tokens
    topk: int  # top-k prompt log-probs the objective needs (0: none)
    reloads: bool  # the student's: weights are reloaded after every step
    weight_transfer: bool = False  # the student's with sync nccl: vLLM's weight-transfer endpoints
    chat_template_kwargs: dict = field(default_factory=dict)  # what our rendering passed to the template


def check_served_model(client: ServerClient, expected: ServedExpectation) -> None:
    """Every start-up check of one server; a failing one raises ServedModelMismatch naming key and URL."""
    where = f"{expected.key}: {client.url}"
    try:
        served = client.models()
        if not served:
            raise ServedModelMismatch(f"{where} serves no model")
        length = int(served[0].get("max_model_len") or 0)
        if length < expected.required_length:
            raise ServedModelMismatch(
                f"{where} has max_model_len {length}, and a prompt, its response and one scored token need "
                f"{expected.required_length} (start it with --max-model-len {expected.required_length} or more)")
        _check_vocabulary(client, expected, where)
        _check_rendering(client, expected, where)
        if expected.topk:
            _check_logprob_depth(client, expected.topk, where)
        if expected.reloads:
            _check_reload_endpoint(client, where)
        if expected.weight_transfer:
            _check_weight_transfer(client, where)
    except ServerUnavailable as error:
        raise ServedModelMismatch(f"{expected.key}: {error}") from None


def _check_vocabulary(client: ServerClient, expected: ServedExpectation, where: str) -> None:
    width = max(len(expected.tokenizer), expected.width)
    try:
        client.complete({"prompt": [width - 1], "max_tokens": 1})
    except ServerRefused as error:
        raise ServedModelMismatch(f"{where} refuses token id {width - 1}, which our model has (a smaller "
                                  f"vocabulary: another model?): {error}") from None
    try:
        client.complete({"prompt": [width], "max_tokens": 1})
    except ServerRefused:
        return
    raise ServedModelMismatch(f"{where} accepts token id {width}, beyond our model's {width} ids (a larger "
                              f"vocabulary: another model?)")


def _check_rendering(client: ServerClient, expected: ServedExpectation, where: str) -> None:
    ours = list(expected.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    theirs = client.tokenize_text(PROBE_TEXT, add_special_tokens=False)
    if theirs != ours:
        raise ServedModelMismatch(f"{where} tokenizes a probe text differently from our tokenizer "
                                  f"({_first_difference(ours, theirs)}): another tokenizer")
    for prompt, ids in expected.renderings:
        if expected.prompt_format == "raw":
            theirs = client.tokenize_text(prompt, add_special_tokens=True)
        else:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            theirs = client.tokenize_messages(messages, expected.chat_template_kwargs)
        if theirs != list(ids):
            raise ServedModelMismatch(
                f"{where} renders a prompt of the data differently ({_first_difference(list(ids), theirs)}): "
                f"another chat template? start the server with the model's template (--chat-template FILE)")


def _check_logprob_depth(client: ServerClient, topk: int, where: str) -> None:
    try:
        client.complete({"prompt": [0, 0], "max_tokens": 1, "prompt_logprobs": topk})
    except ServerRefused as error:
        raise ServedModelMismatch(f"{where} cannot return top-{topk} log-probs (start it with --max-logprobs "
                                  f"{topk} or more): {error}") from None


def _check_reload_endpoint(client: ServerClient, where: str) -> None:
    try:
        client.reset_prefix_cache()
    except ServerRefused as error:
        raise ServedModelMismatch(f"{where} has no weight-reload endpoints (start it with VLLM_SERVER_DEV_MODE=1 "
                                  f"in its environment, as `opd serve` does): {error}") from None


def _check_weight_transfer(client: ServerClient, where: str) -> None:
    """The NCCL sync's control plane: vLLM's weight-transfer routes (`/get_world_size` among them) answer."""
    try:
        workers = client.request("GET", "/get_world_size")
    except ServerRefused as error:
        raise ServedModelMismatch(f"{where} has no weight-transfer endpoints, which sync: nccl drives (a vLLM "
                                  f"with the weight-transfer API, VLLM_SERVER_DEV_MODE=1 and --weight-transfer-config "
                                  f"'{{\"backend\": \"nccl\"}}', as `opd serve --weight-transfer nccl` starts it): "
                                  f"{error}") from None
    if not isinstance(workers, dict) or int(workers.get("world_size") or 0) < 1:
        raise ServedModelMismatch(f"{where}/get_world_size answered {workers!r}, not a worker count")


def _first_difference(ours: list[int], theirs: list[int]) -> str:
    position = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return (f"first at token {position}: ours {ours[position : position + 3]}, the server's "
            f"{theirs[position : position + 3]}; {len(ours)} vs {len(theirs)} tokens")


# --------------------------------------------------------------------------- after the first sync


@torch.no_grad()
def check_serves_student(client: ServerClient, model: nn.Module, prompt: list[int], *, temperature: float,
                         tolerance: float, key: str) -> None:
    """The server holds the student's weights and reports the sampled tokens' log-probs at `temperature`.
    Every rank must call it (the student's forward may be sharded)."""
    answer = client.complete({"prompt": prompt, "max_tokens": 8, "temperature": temperature, "logprobs": 0,
                              "return_token_ids": True, "ignore_eos": True, "seed": 0})
    sampled = list(answer["choices"][0]["token_ids"])
    reported = torch.tensor(answer["choices"][0]["logprobs"]["token_logprobs"], dtype=torch.float64)
    scored = client.complete({"prompt": prompt + sampled, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0})
    positions = scored["choices"][0]["prompt_logprobs"][len(prompt):]
    served_raw = torch.tensor([position[str(t)]["logprob"] for position, t in zip(positions, sampled)],
                              dtype=torch.float64)
    logits = model(input_ids=torch.tensor([prompt + sampled], device=model.device)).logits[0].double().cpu()
    predicting = logits[len(prompt) - 1 : len(prompt) - 1 + len(sampled)]
    tokens = torch.tensor(sampled)[:, None]
    ours_raw = torch.log_softmax(predicting, dim=-1).gather(1, tokens)[:, 0]
    ours_tempered = torch.log_softmax(predicting / temperature, dim=-1).gather(1, tokens)[:, 0]
    weights_gap = float((served_raw - ours_raw).abs().mean())
    if weights_gap > tolerance:
        raise ServedModelMismatch(
            f"{key}: {client.url} does not serve the student after the weight sync: its log-probs of a probe "
            f"sequence differ from the student's by {weights_gap:.4f} nats on average (tolerance {tolerance:g}, "
            f"rollout.server.probe_tolerance); is it a different architecture or dtype?")
    sampling_gap = float((reported - ours_tempered).abs().mean())
    if sampling_gap > tolerance:
        raise ServedModelMismatch(
            f"{key}: {client.url} reports sampled tokens' log-probs {sampling_gap:.4f} nats away from the "
            f"student's at temperature {temperature:g} (tolerance {tolerance:g}); start it with --logprobs-mode "
            f"processed_logprobs, so that they are of the distribution sampled from")
