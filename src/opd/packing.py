"""Padding-free forwards: every row's real (prompt + response) tokens in one packed row, and the
token-budget micro-batches that such rows are cut into.

A packed row holds the rows' real tokens one after another, with position ids restarting at 0 for each
row. transformers (5.x) reads restarting position ids, given with `attention_mask=None`, as packed
sequences: for sdpa, eager and flex attention `create_causal_mask` builds a block-diagonal causal mask
(exact on the CPU; the attention still runs over the whole packed row, so its cost is quadratic in the
packed length), and flash-attention 2/3 derive `cu_seqlens` from them and run the varlen kernel (attention
cost per sequence). The MLP and projections run on real tokens only in every case.

What it leaves out: the output head and log-probs (scoring.py), the loss (objectives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True, kw_only=True, slots=True)
class PackedRows:
    """The real tokens of N left-padded prompts + right-padded responses as one packed row."""

    input_ids: Tensor  # [1, L] long, L = real tokens of all rows
    position_ids: Tensor  # [1, L] long, restarting at 0 for each row
    # The packed index of the state that predicts each response token where response_mask is True
    # (the state of the token before it), in row-major order of the mask.
    predicting: Tensor  # [M] long


def pack_rows(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor) -> PackedRows:
    """Pack [N, P] + [N, T] rows; the padded forward's context of every response token is kept exactly."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)  # [N, P + T]
    real = torch.cat([prompt_mask, response_mask], dim=1).bool()  # [N, P + T]
    positions = real.long().cumsum(dim=1) - 1  # as the padded forward counts them: real tokens only
    packed_index = real.flatten().long().cumsum(dim=0).view(real.shape) - 1  # [N, P + T]
    width = prompt_ids.shape[1]
    # Response token t is predicted by the state at column P - 1 + t, which must be a real token.
    before = real[:, width - 1 : width - 1 + response_ids.shape[1]]
    if not bool(before[response_mask.bool()].all()):
        raise ValueError("pack_rows: a response token follows a padding position (an empty prompt, or a "
                         "response mask that is not a prefix of its row)")
    predicting = packed_index[:, width - 1 : width - 1 + response_ids.shape[1]][response_mask.bool()]
    return PackedRows(input_ids=ids[real][None], position_ids=positions[real][None], predicting=predicting)


def packed_hidden_states(body: nn.Module, packed: PackedRows, response_mask: Tensor) -> Tensor:
    """The decoder body's final states [N, T, H] at the response positions, from one packed forward;
    zero where response_mask [N, T] is False (the padded forward leaves unused values there)."""
    # attention_mask=None is what makes transformers read the restarting positions as separate sequences.
    outputs = body(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
                   use_cache=False)
    states = outputs.last_hidden_state[0, packed.predicting]  # [M, H]
    hidden = states.new_zeros(*response_mask.shape, states.shape[-1])
    hidden[response_mask.bool()] = states
    return hidden


def forward_tokens(prompt_mask: Tensor, response_mask: Tensor, packed: bool) -> list[int]:
    """What each row costs a forward, in tokens: its real tokens when packed, else the padded width."""
    if packed:
        return (prompt_mask.sum(dim=1) + response_mask.sum(dim=1)).tolist()
    return [prompt_mask.shape[1] + response_mask.shape[1]] * prompt_mask.shape[0]


def shortest_first(prompt_mask: Tensor, response_mask: Tensor) -> Tensor:
    """Row indices [N] by their real tokens (prompt + response), shortest first, ties in row order: the
    order in which grouped micro-batches and scoring forwards take rows (optim.group_by_length)."""
    return torch.sort(prompt_mask.sum(dim=1) + response_mask.sum(dim=1), stable=True).indices


def token_budget_slices(row_tokens: list[int], budget: int) -> list[slice]:
    """Consecutive rows, filled greedily while their tokens stay within `budget`. A row longer than the
    budget is a micro-batch of its own: every row is trained on, and no micro-batch is larger than needed."""
    slices, start, used = [], 0, 0
    for row, tokens in enumerate(row_tokens):
        if row > start and used + tokens > budget:
            slices.append(slice(start, row))
            start, used = row, 0
        used += tokens
    if start < len(row_tokens):
        slices.append(slice(start, len(row_tokens)))
    return slices
