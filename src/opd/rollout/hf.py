"""Student rollouts on the Hugging Face model itself (decode.py's loop), recording the sampler's log-prob of
every token.

Two traps this module avoids:
- A checkpoint's own `generation_config.json` (Qwen3 ships temperature 0.6, top_k 20, top_p 0.95)
  would silently override our sampling settings under `generate`; the loop reads only our settings.
- Keeping every step's [N, V] scores (gigabytes at 151k vocab): each step keeps the sampled token's
  log-prob and the distribution's entropy only.

The recorded lOld is the log-prob under the distribution the token was actually drawn from (after
temperature and top-p), which is what importance sampling needs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from opd.rollout.batch import Responses, SamplingSettings, concatenate, finish_responses, left_pad, place_prefixes
from opd.rollout.decode import Chooser, decode, multinomial_over_the_batch


_LOW_32_BITS = 0xFFFFFFFF


def _times_mod_2_32(values: Tensor, constant: int) -> Tensor:
    """values * constant mod 2^32 for values < 2^32, in int64 without overflow (split in 16-bit halves)."""
    high = (values * (constant >> 16)) & 0xFFFF
    return (values * (constant & 0xFFFF) + (high << 16)) & _LOW_32_BITS


def _mix(values: Tensor) -> Tensor:
    """A 32-bit integer hash (Wellons' lowbias32): every input bit moves about half the output bits."""
    values = values & _LOW_32_BITS
    values = _times_mod_2_32(values ^ (values >> 16), 0x7FEB352D)
    values = _times_mod_2_32(values ^ (values >> 15), 0x846CA68B)
    return values ^ (values >> 16)


def shared_uniforms(seed: int, rows: Tensor, position: int, width: int) -> Tensor:
    """[len(rows), width] float32 uniforms in (0, 1), a function of (seed, row, position, token id) only:
    the same numbers whatever else is in the batch, however the rows are split into generate calls and
    whichever model asks. 24 bits each (float32 holds them exactly, never 0 or 1): the Gumbel noise made
    from them is cut at about 17.3, which a draw passes with probability 2^-25."""
    seed_key = _mix(torch.full_like(rows, seed & _LOW_32_BITS)) ^ ((seed >> 32) & _LOW_32_BITS)  # seeds reach 2^62
    key = _mix(_mix(_mix(seed_key) ^ rows) ^ position)  # [N]
    tokens = torch.arange(width, dtype=torch.long) * 0x9E3779B9  # distinct per token, spread over the bits
    bits = _mix(key[:, None] ^ tokens[None, :]) >> 8  # [N, width], 24 bits
    return (bits.float() + 0.5) / 2.0**24


def shared_noise_chooser(seed: int, first_row: int) -> Chooser:
    """Sampling with shared randomness: the argmax of the scores plus Gumbel noise made from
    `shared_uniforms`. The argmax of (tempered scores + Gumbel noise) is an exact draw from the tempered
    distribution (the Gumbel-max trick), so each model is sampled as usual; two models asked the same rows
    draw with the same noise, so where their distributions agree they pick the same tokens. That couples
    their measurements: the noise of the sampling mostly cancels in a paired difference instead of adding
    the variance of two independent draws. A row is keyed by `first_row` + its index in the batch."""

    def choose(scores: Tensor, rows: Tensor, step: int) -> Tensor:
        uniforms = shared_uniforms(seed, first_row + rows.cpu(), step, scores.shape[1])
        gumbel = -torch.log(-torch.log(uniforms))
        return (scores + gumbel.to(device=scores.device, dtype=scores.dtype)).argmax(dim=-1)

    return choose


def _greedy(scores: Tensor, rows: Tensor, step: int) -> Tensor:
    return scores.argmax(dim=-1)


@torch.no_grad()
def generate_responses(
    model: nn.Module, prompts: list[list[int]], settings: SamplingSettings, prefixes: list[list[int]] | None = None,
    kept_width: int | None = None, shared_noise: tuple[int, int] | None = None,
) -> Responses:
    """One sampled response per prompt row, continuing `prefixes[i]` (teacher tokens) when given; with
    `kept_width`, from the head's first kept_width ids only (a teacher's dropped padded logits). With
    `shared_noise` = (seed, index of the first row), rows draw with `shared_noise_chooser` (measurements
    that pair models; a row is keyed by its index among all rows sampled).

    A prefix is part of the response (flagged in `from_teacher`), the model continues after it, and the
    whole response is cut at max_new_tokens.
    """
    prefixes = prefixes or [[] for _ in prompts]
    prompt_ids, prompt_mask = left_pad([p + x for p, x in zip(prompts, prefixes, strict=True)], settings.pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(model.device), prompt_mask.to(model.device)
    was_training = model.training
    model.eval()
    # Inference mode skips autograd's version counters and view tracking: about a tenth of a small model's
    # decode step on a CPU, with the same tokens bit for bit. Sharded students keep no_grad: FSDP's unshard
    # keeps state of its own across forwards, which inference tensors may not enter.
    mode = torch.no_grad() if settings.synced else torch.inference_mode()
    try:
        with mode:
            decoded = decode(model, prompt_ids, prompt_mask,
                             max_new_tokens=max(settings.max_new_tokens - min(len(x) for x in prefixes), 1),
                             end_ids=settings.end_of_sequence_ids, pad_id=settings.pad_id,
                             process=_scores(settings, kept_width), choose=_chooser(settings, shared_noise, len(prompts)),
                             synced=settings.synced)
        # Cloned outside inference mode, so that what follows holds ordinary tensors, which training may modify
        # in place and save for backward (an inference tensor may do neither).
        generated, logprobs, entropy = (t.cpu().clone() for t in (decoded.tokens, decoded.logprobs, decoded.entropy))
    finally:
        model.train(was_training)
    if not any(prefixes):  # no teacher prefix in any row
        return finish_responses(generated, logprobs, entropy, torch.zeros_like(generated, dtype=torch.bool), settings)
    return _after_prefixes(prefixes, generated, logprobs, entropy, settings)


def _scores(settings: SamplingSettings, kept_width: int | None):
    """A step's logits [R, V] -> the scores tokens are drawn from: the kept columns, then the temperature
    and top-p (HF's own warpers); greedy decoding (temperature 0) keeps the untempered distribution, whose
    log-probs are recorded."""
    greedy = settings.temperature == 0  # evaluation only (opd eval --temperature 0): rollouts sample at > 0
    warpers = [] if greedy else [TemperatureLogitsWarper(settings.temperature)]
    if settings.top_p < 1.0 and not greedy:  # the argmax is in every top-p set
        warpers.append(TopPLogitsWarper(top_p=settings.top_p))

    def process(logits: Tensor) -> Tensor:
        if kept_width is not None:  # ids >= kept_width cannot be drawn (the distribution the teacher is scored by)
            logits[:, kept_width:] = float("-inf")
        for warper in warpers:
            logits = warper(None, logits)
        return logits

    return process


def _chooser(settings: SamplingSettings, shared_noise: tuple[int, int] | None, count: int) -> Chooser:
    if settings.temperature == 0:
        return _greedy
    if shared_noise is not None:
        return shared_noise_chooser(*shared_noise)
    return multinomial_over_the_batch(count)


def _after_prefixes(prefixes: list[list[int]], generated: Tensor, logprobs: Tensor, entropy: Tensor,
                    settings: SamplingSettings) -> Responses:
    """Each row's response: its teacher prefix (flagged in `from_teacher`, log-prob and entropy 0), then what
    the model generated after it, cut at max_new_tokens."""
    width = settings.max_new_tokens
    ids, from_teacher = place_prefixes(prefixes, width, settings.pad_id)
    row_logprobs, row_entropy = torch.zeros(len(prefixes), width), torch.zeros(len(prefixes), width)
    for row, prefix in enumerate(prefixes):
        take = min(len(prefix), width)
        rest = min(width - take, generated.shape[1])
        ids[row, take : take + rest] = generated[row, :rest]
        row_logprobs[row, take : take + rest] = logprobs[row, :rest]
        row_entropy[row, take : take + rest] = entropy[row, :rest]
    return finish_responses(ids, row_logprobs, row_entropy, from_teacher, settings)


def sample_in_batches(model: nn.Module, prompts: list[list[int]], settings: SamplingSettings,
                      prefixes: list[list[int]] | None = None, kept_width: int | None = None,
                      shared_noise_seed: int | None = None) -> Responses:
    """`generate_responses` over `settings.batch_size` rows at a time; with `shared_noise_seed`, every row
    draws with noise that depends on the seed, its index in `prompts` and the position only."""
    parts = []
    for start in range(0, len(prompts), settings.batch_size):
        stop = start + settings.batch_size
        noise = None if shared_noise_seed is None else (shared_noise_seed, start)
        parts.append(generate_responses(model, prompts[start:stop], settings,
                                        prefixes[start:stop] if prefixes is not None else None, kept_width, noise))
    return concatenate(parts, settings.pad_id)


class HfSampler:
    """The `Sampler` that is the model itself: `generate` on the training (or a frozen) model, so its
    weights are always current and `sync` has nothing to do."""

    def __init__(self, model: nn.Module, kept_width: int | None = None, shared_noise: bool = False):
        self.model = model
        self.kept_width = kept_width  # a teacher's drop_padded_logits: sample from its scored distribution
        self.shared_noise = shared_noise  # rollout.shared_noise: draw with noise keyed by the step's seed

    def sample(self, prompts: list[list[int]], settings: SamplingSettings,
               prefixes: list[list[int]] | None = None) -> Responses:
        if self.shared_noise and settings.seed is None:
            raise ValueError("rollout.shared_noise needs the step's rollout seed (SamplingSettings.seed); got None")
        return sample_in_batches(self.model, prompts, settings, prefixes, self.kept_width,
                                 shared_noise_seed=settings.seed if self.shared_noise else None)

    def sync(self, model: nn.Module) -> None:
        pass

    def close(self) -> None:
        pass
