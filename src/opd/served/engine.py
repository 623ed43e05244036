"""Models served by vLLM servers over HTTP: the student's rollouts (rollout.backend: vllm-server), a
teacher's or reference's scores (teachers.N.backend: vllm-server, a reference given as a URL).

One `ServedModel` is a `Sampler` (sample, sync, close) and a `Scorer` (score) over one or more servers that
serve the same model. Requests are spread over the servers round-robin (offset by the rank, so that several
training processes sharing the servers start on different ones), with at most `max_concurrency` in flight
per process. What the servers must be started with is in `served/launch.py` (`opd serve` starts them so).

- **Sampling** sends each prompt's token ids (a teacher prefix appended) with `n` samples, the stop ids of
  the student and `ignore_eos` (so that only the student's end-of-sequence ids end a response), and a seed
  drawn from the step's own generator (rollout/batch.py `draws`: a resumed step draws the same seeds). The sampled tokens'
  log-probs are those of the distribution sampled from (temperature and top-p applied), which needs the
  server's `--logprobs-mode processed_logprobs`; `check_sampler_logprobs` verifies it after the first sync.
- **Scoring** asks for `prompt_logprobs` (with the top-k where the objective needs it) of prompt + response:
  the log-prob of every response token given the tokens before it, at temperature 1 (vLLM takes prompt
  log-probs from the raw logits; other scoring temperatures are refused at start-up).
- **Weight sync** (`rollout.server.sync: folder`): rank 0 writes the student's weights (LoRA merged; FSDP
  shards gathered) as one safetensors file into the sync folder, every server reloads them from it and
  resets its prefix cache (cached attention state of the old weights would otherwise be reused), and every
  rank waits for that before it samples again. `sync: nccl` broadcasts them from GPU memory instead
  (served/nccl.py), then resets the prefix caches the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from opd.rollout.batch import (
    Responses,
    SamplingSettings,
    consecutive_groups,
    draws,
    finish_responses,
    place_prefixes,
)
from opd.rollout.vllm import policy_weights
from opd.runtime import distributed
from opd.served.checks import check_serves_student
from opd.served.client import RetrySettings, ServerClient, map_bounded
from opd.served.nccl import NcclTransfers
from opd.types import ScoreRequest, TokenScores

WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True, kw_only=True, slots=True)
class ServedSettings:
    urls: tuple[str, ...]
    max_concurrency: int  # requests in flight per training process
    retry: RetrySettings
    sync: str | None = None  # the student's: folder | nccl (config.ServerConfig.sync); None: a frozen model
    sync_folder: str | None = None  # folder sync: where new weights are written for the servers to read
    nccl_address: str | None = None  # nccl sync: host:port of rank 0's rendezvous (server i: port + i)
    key: str = "rollout.server"  # the config key, for messages
    # The student's: a token sequence the servers are probed with after the first sync (served/checks.py).
    probe_prompt: tuple[int, ...] = ()
    probe_temperature: float = 1.0  # the sampling temperature the probe checks the reported log-probs at
    probe_tolerance: float = 0.05


@dataclass(frozen=True, kw_only=True, slots=True)
class _Request:
    client: ServerClient
    body: dict


class ServedModel:
    """A model on vLLM servers: a `Sampler` and a `Scorer`."""

    sharded = False  # a served model has no collectives to pair (teachers.py)

    def __init__(self, settings: ServedSettings):
        self.settings = settings
        self.clients = [ServerClient(url, settings.retry) for url in settings.urls]
        self.synced_once = False
        self.transfers = (NcclTransfers(self.clients, settings.nccl_address, settings.retry.timeout_seconds)
                          if settings.sync == "nccl" else None)

    def _spread(self, bodies: list[dict]) -> list[dict]:
        """POST each body to /v1/completions, round-robin over the servers, bounded; answers in order."""
        offset = distributed.rank()
        requests = [_Request(client=self.clients[(index + offset) % len(self.clients)], body=body)
                    for index, body in enumerate(bodies)]
        return map_bounded(lambda request: request.client.complete(request.body), requests,
                           self.settings.max_concurrency)

    # ----------------------------------------------------------------------- sampling

    def sample(self, prompts: list[list[int]], settings: SamplingSettings,
               prefixes: list[list[int]] | None = None) -> Responses:
        """One response per prompt row, continuing `prefixes[i]` when given (the contract of
        hf.generate_responses); consecutive identical rows (a prompt's samples) are one request with n."""
        prefixes = prefixes or [[] for _ in prompts]
        width = settings.max_new_tokens
        groups = consecutive_groups([p + x for p, x in zip(prompts, prefixes, strict=True)])
        bodies, sampled_groups = [], []
        generator = draws(settings, stream=0)
        for start, count in groups:
            remaining = width - len(prefixes[start])
            if remaining <= 0:
                continue  # the prefix fills the whole response: nothing left to sample
            bodies.append(sampling_body(prompts[start] + prefixes[start], count, remaining, settings,
                                        generator))
            sampled_groups.append((start, count))
        answers = self._spread(bodies)
        ids, from_teacher = place_prefixes(prefixes, width, settings.pad_id)
        logprobs = torch.zeros(len(prompts), width)
        for (start, count), answer in zip(sampled_groups, answers, strict=True):
            choices = sorted(answer["choices"], key=lambda choice: choice["index"])
            if len(choices) != count:
                raise ValueError(f"{self.settings.key}: a server answered {len(choices)} samples for n={count}")
            for offset, choice in enumerate(choices):
                row = start + offset
                begin = len(prefixes[row])
                tokens, values = sampled_tokens(choice)
                tokens, values = tokens[: width - begin], values[: width - begin]
                ids[row, begin : begin + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                logprobs[row, begin : begin + len(tokens)] = torch.tensor(values)
        # A server reports the sampled token's log-prob only, not the sampling distribution's entropy.
        return finish_responses(ids, logprobs, None, from_teacher, settings)

    # ----------------------------------------------------------------------- scoring

    def score(self, request: ScoreRequest) -> TokenScores:
        """Log-probs of each response token given its prompt and the tokens before it, at temperature 1,
        with the `topk` most likely tokens when asked. A server reports neither entropies nor hidden states."""
        if request.with_entropy or request.with_hidden:
            raise ValueError("served scoring returns log-probs and top-k only (refused at start-up; see checks.py)")
        prompts = [ids[mask].tolist() for ids, mask in zip(request.prompt_ids, request.prompt_mask, strict=True)]
        responses = [ids[mask].tolist()
                     for ids, mask in zip(request.response_ids, request.response_mask, strict=True)]
        answers = self._spread([scoring_body(p + r, request.topk) for p, r in zip(prompts, responses, strict=True)])
        scored = [response_scores(answer, len(prompt), response, request.topk)
                  for answer, prompt, response in zip(answers, prompts, responses, strict=True)]
        if not request.topk:
            return TokenScores(logprobs=torch.cat([s.logprobs for s in scored]))
        return TokenScores(logprobs=torch.cat([s.logprobs for s in scored]),
                           topk_ids=torch.cat([s.topk_ids for s in scored]),
                           topk_logprobs=torch.cat([s.topk_logprobs for s in scored]))

    def idle_forward(self) -> None:
        """Nothing to pair: a served model is never sharded (see `sharded`)."""

    # ----------------------------------------------------------------------- weights

    def sync(self, model: nn.Module) -> None:
        """Every server takes the training model's current weights; every rank must call this."""
        if self.settings.sync is None:
            raise ValueError(f"{self.settings.key}: a frozen served model (a teacher) takes no weights")
        weights = served_weights(model) if self.transfers is None else None
        # No rank's requests are in flight when the servers reload: with rollout.async a rank syncs only
        # once its own rollout thread is idle (pipelined.py), and the reload waits here for every rank.
        distributed.barrier()
        if self.transfers is not None:
            self.transfers.send(model)  # every rank: the gathers of FSDP2 shards are collectives
        elif distributed.is_main():
            folder = Path(self.settings.sync_folder)
            write_weights(weights, folder)
            for client in self.clients:
                client.reload_weights(str(folder.resolve()))
        if distributed.is_main():
            for client in self.clients:
                client.reset_prefix_cache()
        distributed.barrier()  # no rank samples before every server holds the new weights
        if not self.synced_once and self.settings.probe_prompt:
            for client in self.clients:
                check_serves_student(client, model, list(self.settings.probe_prompt),
                                     temperature=self.settings.probe_temperature,
                                     tolerance=self.settings.probe_tolerance, key=self.settings.key)
        self.synced_once = True

    def close(self) -> None:
        """The servers are not ours to stop (`opd serve` or the user started them); an NCCL group is ours."""
        if self.transfers is not None:
            self.transfers.close()


# --------------------------------------------------------------------------- request bodies and answers


def sampling_body(prompt: list[int], count: int, max_tokens: int, settings: SamplingSettings,
                  generator: torch.Generator | None = None) -> dict:
    return {
        "prompt": prompt, "n": count, "max_tokens": max_tokens, "temperature": settings.temperature,
        "top_p": settings.top_p, "logprobs": 0, "return_token_ids": True,
        "stop_token_ids": list(settings.end_of_sequence_ids), "ignore_eos": True,
        "seed": int(torch.randint(0, 2**31 - 1, (), generator=generator)),
    }


def scoring_body(tokens: list[int], topk: int) -> dict:
    return {"prompt": tokens, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": topk}


def sampled_tokens(choice: dict) -> tuple[list[int], list[float]]:
    """A completion choice's sampled token ids and their log-probs."""
    tokens = choice.get("token_ids")
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
    if tokens is None or logprobs is None or len(tokens) != len(logprobs):
        raise ValueError("a server's completion carries no token ids with log-probs (a vLLM server too old for "
                         "`return_token_ids`?)")
    return list(tokens), [float(value) for value in logprobs]


def response_scores(answer: dict, prompt_length: int, response: list[int], topk: int) -> TokenScores:
    """One response's TokenScores ([T], [T, K]) from the prompt_logprobs of prompt + response."""
    positions = answer["choices"][0]["prompt_logprobs"][prompt_length : prompt_length + len(response)]
    entries = [{int(token): value for token, value in position.items()} for position in positions]
    logprobs = torch.tensor([entry[token]["logprob"] for entry, token in zip(entries, response)])
    if not topk:
        return TokenScores(logprobs=logprobs)
    # Each entry holds the top-k plus the scored token (rank > k when it is not among them).
    best = [sorted(((t, v) for t, v in entry.items() if v["rank"] <= topk), key=lambda item: item[1]["rank"])[:topk]
            for entry in entries]
    if any(len(row) != topk for row in best):
        raise ValueError(f"a server answered fewer than top-{topk} prompt log-probs")
    # reshape: an empty response gives [0, K], not [0]
    topk_ids = torch.tensor([[t for t, _ in row] for row in best], dtype=torch.int32).reshape(len(response), topk)
    topk_logprobs = torch.tensor([[v["logprob"] for _, v in row] for row in best]).reshape(len(response), topk)
    return TokenScores(logprobs=logprobs, topk_ids=topk_ids, topk_logprobs=topk_logprobs)


# --------------------------------------------------------------------------- weights


def served_weights(model: nn.Module) -> dict[str, Tensor] | None:
    """The model's weights by Hugging Face name on rank 0 (LoRA merged; FSDP shards gathered), None on
    the other ranks; every rank must call it."""
    if distributed.world_size() > 1:
        return distributed.full_state_dict(model)
    return dict(policy_weights(model))


def write_weights(weights: dict[str, Tensor], folder: Path) -> None:
    """One safetensors file, replaced atomically: a server never reads a half-written one. Tied tensors
    (an embedding shared with the output head) are written once, under their first name."""
    folder.mkdir(parents=True, exist_ok=True)
    seen, unique = set(), {}
    for name, tensor in weights.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        unique[name] = tensor.detach().contiguous().cpu()
    partial = folder / (WEIGHTS_FILE + ".partial")
    save_file(unique, str(partial))
    os.replace(partial, folder / WEIGHTS_FILE)
