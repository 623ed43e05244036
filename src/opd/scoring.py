"""Log-probs, top-k and entropy of sampled tokens, computed from hidden states in token chunks.

This module owns algorithms §6: the `[tokens, vocab]` logits of a batch are never materialised.
Hidden states are taken at response positions only, flattened to `[M, H]` (M = response tokens in the
batch), and the output head is applied `chunk_size` tokens at a time. For the student, a custom autograd
function saves only the hidden states and recomputes each chunk's logits in the backward pass, so the
extra memory of the loss is O(chunk_size * V) instead of O(M * V).

What it leaves out: choosing which model scores which row (routing lives in `teachers.py`) and any
loss math (objectives).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from opd.packing import pack_rows, packed_hidden_states
from opd.runtime.lora import causal_lm


def output_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The (weight [V, H], bias [V] | None) of a causal LM's output projection.

    Heads that transform logits after the projection (soft-capping, logit scales) would make our
    chunked log-probs differ from the model's own: refuse them instead of computing something else.
    """
    model = causal_lm(model)
    config = getattr(model, "config", None)
    for attribute in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(config, attribute, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} post-processes its logits (config.{attribute}={value}); "
                "opd's chunked scorer supports plain linear output heads only"
            )
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise NotImplementedError(
            f"{type(model).__name__}'s output head is {type(head).__name__}, not nn.Linear; "
            "opd's chunked scorer supports plain linear output heads only"
        )
    return head.weight, head.bias


def response_hidden_states(
    model: nn.Module,
    prompt_ids: Tensor,  # [N, P] left-padded
    prompt_mask: Tensor,  # [N, P] bool
    response_ids: Tensor,  # [N, T] right-padded
    response_mask: Tensor,  # [N, T] bool
    *,
    packed: bool = False,  # one packed row of real tokens (packing.py) instead of the padded rows
) -> Tensor:  # [N, T, H]: the final hidden state that predicts each response token
    """Run the decoder body (no output head) over prompt + response."""
    body = causal_lm(model).base_model  # the decoder without the head; its last_hidden_state is post-norm
    if packed:
        return packed_hidden_states(body, pack_rows(prompt_ids, prompt_mask, response_ids, response_mask),
                                    response_mask)
    # Only the columns these rows use: the prompts' common left padding and the responses' common right
    # padding are masked out of attention and change nothing but the cost. A micro-batch of short rows
    # (group_by_length) or responses padded to max_new_tokens (teacher prefixes) run at their own width.
    start, width = used_columns(prompt_mask, response_mask)
    prompt_ids, prompt_mask = prompt_ids[:, start:], prompt_mask[:, start:]
    input_ids = torch.cat([prompt_ids, response_ids[:, :width]], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask[:, :width]], dim=1).long()
    # Left padding: positions count real tokens only, as generation did, so scores match the sampler.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    outputs = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    prompt_width = prompt_ids.shape[1]
    # The state at position i predicts token i + 1, so response token t is predicted at P - 1 + t.
    hidden = outputs.last_hidden_state[:, prompt_width - 1 : prompt_width - 1 + width]
    missing = response_ids.shape[1] - width
    return hidden if missing == 0 else nn.functional.pad(hidden, (0, 0, 0, missing))  # cut columns: no token


def used_columns(prompt_mask: Tensor, response_mask: Tensor) -> tuple[int, int]:
    """(the first prompt column any row uses, the response width any row uses) of left-padded prompts
    [N, P] and right-padded responses [N, T]."""
    used_prompt = prompt_mask.any(dim=0).nonzero()
    used_response = response_mask.any(dim=0).nonzero()
    start = int(used_prompt[0]) if len(used_prompt) else 0
    return start, int(used_response[-1]) + 1 if len(used_response) else 0


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float = 1.0) -> Tensor:
    """One chunk's logits [chunk, V] = hidden [chunk, H] @ weight.T + bias, in `score_dtype`, over temperature."""
    # In-place where possible: each [chunk, V] temporary is the dominant memory of the whole loss.
    logits = hidden @ weight.T
    if bias is not None:
        logits += bias
    # At least float32 whatever the model dtype: bf16 log-probs are too coarse for KL estimates.
    logits = logits.to(score_dtype(logits.dtype))
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


def _chunk_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    return torch.log_softmax(head_logits(hidden, weight, bias, temperature), dim=-1)


def score_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision models, float64 stays float64 (the tests' references use it)."""
    return torch.promote_types(model_dtype, torch.float32)


class _ChunkedStudentLogprobs(torch.autograd.Function):
    """lS at target ids (and at extra gather ids) with logits recomputed chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, gather_ids, temperature, chunk_size, with_entropy, own_topk):
        # hidden [M, H]; weight [V, H]; bias [V] | None; target_ids [M]; gather_ids [M, K] (K may be 0);
        # own_topk: also the ids of the student's own K most likely tokens [M, K] (0: none)
        num_tokens, dtype = hidden.shape[0], score_dtype(hidden.dtype)
        logprobs = hidden.new_empty(num_tokens, dtype=dtype)
        gathered = hidden.new_empty(gather_ids.shape, dtype=dtype)
        entropy = hidden.new_zeros(num_tokens if with_entropy else 0, dtype=dtype)
        topk_ids = torch.empty(num_tokens, own_topk, dtype=torch.int32, device=hidden.device)
        for start in range(0, num_tokens, chunk_size):
            stop = min(start + chunk_size, num_tokens)
            chunk_logprobs = _chunk_logprobs(hidden[start:stop], weight, bias, temperature)
            logprobs[start:stop] = chunk_logprobs.gather(1, target_ids[start:stop, None]).squeeze(1)
            gathered[start:stop] = chunk_logprobs.gather(1, gather_ids[start:stop].long())
            if with_entropy:
                entropy[start:stop] = -chunk_logprobs.exp().mul_(chunk_logprobs).sum(dim=-1)
            if own_topk:  # while the chunk's logits exist: no second pass over the head
                topk_ids[start:stop] = chunk_logprobs.topk(own_topk, dim=-1).indices.to(torch.int32)
        ctx.save_for_backward(hidden, weight, bias, target_ids, gather_ids)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy, topk_ids)
        return logprobs, gathered, entropy, topk_ids

    @staticmethod
    def backward(ctx, grad_logprobs, grad_gathered, _grad_entropy, _grad_topk_ids):
        hidden, weight, bias, target_ids, gather_ids = ctx.saved_tensors
        temperature, dtype = ctx.temperature, score_dtype(hidden.dtype)
        if grad_logprobs is None:
            grad_logprobs = torch.zeros(hidden.shape[0], dtype=dtype, device=hidden.device)
        if grad_gathered is None:
            grad_gathered = torch.zeros(gather_ids.shape, dtype=dtype, device=hidden.device)

        def grad_logits_of(start: int, stop: int) -> Tensor:
            probs = torch.softmax(head_logits(hidden[start:stop], weight, bias, temperature), dim=-1)
            g_target = grad_logprobs[start:stop]
            g_gather = grad_gathered[start:stop]
            # d log p_i / d z_j = [i == j] - p_j, summed over every log-prob that received a gradient.
            grad_logits = probs.mul_(-(g_target + g_gather.sum(dim=-1))[:, None])
            grad_logits.scatter_add_(1, target_ids[start:stop, None], g_target[:, None])
            grad_logits.scatter_add_(1, gather_ids[start:stop].long(), g_gather)
            if temperature != 1.0:
                grad_logits.div_(temperature)
            return grad_logits

        grads = chunked_head_backward(hidden, weight, bias, grad_logits_of, chunk_size=ctx.chunk_size,
                                      needs=ctx.needs_input_grad[:3], dtype=dtype)
        return *grads, None, None, None, None, None, None


def chunked_head_backward(
    hidden: Tensor,  # [M, H]
    weight: Tensor,  # [V, H]
    bias: Tensor | None,  # [V]
    grad_logits_of,  # (start, stop) -> the loss's gradient w.r.t. those tokens' logits [stop - start, V]
    *,
    chunk_size: int,
    needs: tuple[bool, bool, bool],  # which of hidden, weight, bias want a gradient
    dtype: torch.dtype,  # what the head's gradients accumulate in
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of hidden, weight and bias for a loss on logits = hidden @ weight.T + bias, one token
    chunk at a time, so that only one chunk's [chunk, V] gradient exists at once."""
    grad_hidden = torch.zeros_like(hidden) if needs[0] else None
    # Accumulate the head's gradient in float32: summing thousands of bf16 chunk products loses bits.
    grad_weight = torch.zeros_like(weight, dtype=dtype) if needs[1] else None
    grad_bias = torch.zeros_like(bias, dtype=dtype) if bias is not None and needs[2] else None
    for start in range(0, hidden.shape[0], chunk_size):
        stop = min(start + chunk_size, hidden.shape[0])
        chunk_hidden = hidden[start:stop]
        grad_logits = grad_logits_of(start, stop).to(weight.dtype)
        if grad_hidden is not None:
            grad_hidden[start:stop] = grad_logits @ weight
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.T.to(dtype), chunk_hidden.to(dtype))
        if grad_bias is not None:
            grad_bias += grad_logits.to(dtype).sum(dim=0)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


def student_token_logprobs(
    hidden: Tensor,  # [M, H] with gradient
    weight: Tensor,  # [V, H]
    bias: Tensor | None,  # [V]
    target_ids: Tensor,  # [M] long
    gather_ids: Tensor | None = None,  # [M, K] ids to gather log-probs at (the teacher's top-k)
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
    with_entropy: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:  # lS [M], lS at gather_ids [M, K] | None, entropy [M] | None
    """Differentiable student log-probs with O(chunk_size * V) extra memory in forward and backward.

    The entropy (detached) costs two extra passes over each chunk's logits; skip it when it is known
    already (the HF sampler records the entropy of the distribution it samples from).
    """
    logprobs, gathered, entropy, _ = student_token_scores(hidden, weight, bias, target_ids, gather_ids,
                                                          temperature=temperature, chunk_size=chunk_size,
                                                          with_entropy=with_entropy)
    return logprobs, gathered, entropy


def student_token_scores(
    hidden: Tensor,  # [M, H] with gradient
    weight: Tensor,  # [V, H]
    bias: Tensor | None,  # [V]
    target_ids: Tensor,  # [M] long
    gather_ids: Tensor | None = None,  # [M, K] ids to gather log-probs at (the teacher's top-k)
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
    with_entropy: bool = True,
    with_own_topk: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """`student_token_logprobs`, and with `with_own_topk` the ids of the student's own K most likely tokens
    [M, K] int32 (K of gather_ids; detached), taken from the logits each chunk computes anyway."""
    _check_chunk(chunk_size, temperature)
    ids = gather_ids if gather_ids is not None else target_ids.new_empty(target_ids.shape[0], 0)
    own_topk = ids.shape[1] if with_own_topk else 0
    logprobs, gathered, entropy, topk_ids = _ChunkedStudentLogprobs.apply(
        hidden, weight, bias, target_ids.long(), ids, temperature, chunk_size, with_entropy, own_topk
    )
    return (logprobs, (gathered if gather_ids is not None else None), (entropy if with_entropy else None),
            (topk_ids if own_topk else None))


@torch.no_grad()
def teacher_token_scores(
    hidden: Tensor,  # [M, H]
    weight: Tensor,  # [V, H]
    bias: Tensor | None,  # [V]
    target_ids: Tensor,  # [M] long
    *,
    topk: int = 0,
    temperature: float = 1.0,
    chunk_size: int = 512,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Detached log-probs of the target tokens [M]; if topk > 0 the k most likely tokens (ids [M, K] int32,
    log-probs [M, K]); if with_entropy the full-vocabulary entropy [M]."""
    _check_chunk(chunk_size, temperature)
    num_tokens, dtype = hidden.shape[0], score_dtype(hidden.dtype)
    logprobs = torch.empty(num_tokens, dtype=dtype, device=hidden.device)
    topk_ids = torch.empty(num_tokens, topk, dtype=torch.int32, device=hidden.device) if topk else None
    topk_logprobs = torch.empty(num_tokens, topk, dtype=dtype, device=hidden.device) if topk else None
    entropy = torch.empty(num_tokens, dtype=dtype, device=hidden.device) if with_entropy else None
    for start in range(0, num_tokens, chunk_size):
        stop = min(start + chunk_size, num_tokens)
        chunk_logprobs = _chunk_logprobs(hidden[start:stop], weight, bias, temperature)
        logprobs[start:stop] = chunk_logprobs.gather(1, target_ids[start:stop, None].long()).squeeze(1)
        if topk:
            values, indices = chunk_logprobs.topk(topk, dim=-1)
            topk_ids[start:stop] = indices.to(torch.int32)
            topk_logprobs[start:stop] = values
        if with_entropy:
            entropy[start:stop] = -chunk_logprobs.exp().mul_(chunk_logprobs).sum(dim=-1)
    return logprobs, topk_ids, topk_logprobs, entropy


@torch.no_grad()
def padded_mass(
    hidden: Tensor,  # [M, H]
    weight: Tensor,  # [V, H], the whole head
    bias: Tensor | None,  # [V]
    target_ids: Tensor,  # [M] long, ids below kept_width
    kept_logprobs: Tensor,  # [M] log-probs of target_ids renormalised over ids < kept_width
    *,
    kept_width: int,
    temperature: float = 1.0,
) -> Tensor:  # [M]: the probability the whole head puts on ids >= kept_width
    """What dropping a padded head's columns removed, without a second pass over the kept columns: the kept
    ids' log-normaliser is z_target - kept_logprob, so only the few padded columns need a matmul."""
    dtype = score_dtype(hidden.dtype)
    target_rows = weight[target_ids.long()]  # [M, H]
    target_logits = (hidden.to(dtype) * target_rows.to(dtype)).sum(dim=-1)
    if bias is not None:
        target_logits += bias[target_ids.long()].to(dtype)
    kept_normaliser = target_logits / temperature - kept_logprobs.to(dtype)
    padded_bias = bias[kept_width:] if bias is not None else None
    padded_normaliser = torch.logsumexp(head_logits(hidden, weight[kept_width:], padded_bias, temperature), dim=-1)
    # exp(padded) / (exp(kept) + exp(padded)), stable for either side dominating.
    return torch.sigmoid(padded_normaliser.to(dtype) - kept_normaliser)


def _check_chunk(chunk_size: int, temperature: float) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"scoring temperature must be > 0, got {temperature}")


def scatter_tokens(values: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """Put per-token values [M, ...] back at the True positions of mask [N, T] -> [N, T, ...]."""
    out = values.new_full((*mask.shape, *values.shape[1:]), fill)
    out[mask] = values
    return out
