"""The one place where per-token losses become a scalar (algorithms §5).

The denominator is counted once for the whole optimizer batch (all micro-batches, all ranks) before the
micro-batch loop, and every micro-batch divides by that same number. Summing the micro-batch losses then
gives exactly the loss of the whole batch, so gradient accumulation and data parallelism do not change the
gradient (unlike a per-micro-batch mean, the bug behind TRL #4719 and ms-swift #10165).
"""

from __future__ import annotations

import typing
from typing import Literal

import torch
from torch import Tensor

# The modes, named once: the config's `objective.aggregation` is typed with this Literal.
Aggregation = Literal["token-mean", "seq-mean-token-mean", "token-sum"]
MODES: tuple[str, ...] = typing.get_args(Aggregation)


def count_denominator(mask: Tensor, mode: str) -> int:
    """What `aggregate` divides by, for the rows of `mask` [N, T]: loss tokens, or sequences that have any."""
    _check_mode(mode)
    if mode == "token-mean":
        return int(mask.sum())
    if mode == "seq-mean-token-mean":
        return int(mask.any(dim=-1).sum())
    return 1


def aggregate(per_token_loss: Tensor, mask: Tensor, mode: str, num_tokens: int | float | None = None) -> Tensor:
    """Reduce per-token losses [N, T] under mask [N, T] to a scalar.

    token-mean: sum of masked losses / num_tokens (default: this mask's token count).
    seq-mean-token-mean: each row's token mean, summed over rows / num_tokens (default: rows with at
        least one token; rows without tokens contribute nothing and are not counted).
    token-sum: sum of masked losses (num_tokens is ignored).
    An empty batch gives 0 (with a gradient path), never NaN.
    """
    _check_mode(mode)
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if mode == "token-sum":
        return masked.sum()
    if mode == "token-mean":
        total = masked.sum()
    else:
        total = (masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)).sum()
    denominator = count_denominator(mask.bool(), mode) if num_tokens is None else num_tokens
    return total / max(float(denominator), 1.0)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid: {list(MODES)}")


def masked_mean(values: Tensor, mask: Tensor) -> float:
    """Plain mean of values where mask is True (0.0 when empty), for metrics."""
    count = int(mask.sum())
    return float((values * mask).sum() / count) if count else 0.0


def masked_quantile(values: Tensor, mask: Tensor, q: float) -> float:
    selected = values[mask.bool()].double()
    return float(torch.quantile(selected, q)) if selected.numel() else 0.0
