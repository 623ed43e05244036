"""The HF sampler's decode loop: prefill, then one token per step, computing only the rows still writing.

Why not `model.generate`: it steps every row of a batch until the last row ends, so the rows that already
ended cost as much as the ones still writing (the lab's sums answers end after ~21 tokens, in batches that
run to ~35; a small model's step is about a third per-row work). This loop drops the rows that ended from
the forward batch and from the KV cache, which changes no other row's logits (each row is computed on its
own, bit for bit: tests/test_rollout_decode.py), and draws the tokens as generate does: the same forward
inputs for the rows still going, the same steps, and for plain sampling one `torch.multinomial` over
every row of the batch (rows that ended get a placeholder distribution, their draw discarded as generate
discards it), so torch's generator advances as under generate and a seeded run samples the same tokens.

Rows are dropped only where every layer of the cache can be cut by row (`DynamicLayer` and its sliding
window variant); a model with another cache (linear-attention states) keeps every row in the batch, which
gives the same tokens at generate's cost. Sharded (FSDP) students need every process in every forward:
with `synced`, a process whose rows have all ended keeps stepping one row, its outputs unused, until every
process has ended (generate's synced_gpus), and draws nothing meanwhile.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from opd.runtime import distributed

# scores [R, V] of the rows `rows` [R] (indices into the batch) at decode step `step` -> tokens [R]
Chooser = Callable[[Tensor, Tensor, int], Tensor]


@dataclass(frozen=True, kw_only=True, slots=True)
class Decoded:
    tokens: Tensor  # [N, S] generated ids, pad after a row's end token (S: the steps the batch ran)
    logprobs: Tensor  # [N, S] log-prob of each token under the distribution it was drawn from; 0 after the end
    entropy: Tensor  # [N, S] entropy of that distribution; 0 after the end


def decode(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
           end_ids: tuple[int, ...], pad_id: int, process: Callable[[Tensor], Tensor], choose: Chooser,
           synced: bool = False) -> Decoded:
    """Sample up to max_new_tokens tokens after each left-padded prompt row ([N, P] ids and mask).

    `process` turns a step's float32 logits [R, V] into the scores tokens are drawn from (kept columns,
    temperature, top-p); the recorded log-prob and entropy are of softmax(scores); `choose` picks the
    tokens from the scores. The loop stops when every row has written an end token or max_new_tokens."""
    count = prompt_ids.shape[0]
    batch = _ForwardBatch(model, prompt_mask)
    running = torch.ones(count, dtype=torch.bool, device=prompt_ids.device)  # no end token yet
    end_ids_tensor = torch.tensor(end_ids, device=prompt_ids.device)
    inputs = prompt_ids
    columns: list[tuple[Tensor, Tensor, Tensor]] = []
    while True:
        finished = len(columns) == max_new_tokens or not bool(running.any())
        if _all_finished(finished, synced):
            break
        logits = batch.forward(inputs)
        if finished:  # synced: stepping for the other processes only
            continue
        columns.append(_step(process, choose, logits, batch.rows, running, len(columns), pad_id))
        running &= ~torch.isin(columns[-1][0], end_ids_tensor)
        batch.keep(_rows_to_keep(batch, running, synced))
        inputs = columns[-1][0][batch.rows][:, None]
    tokens, logprobs, entropy = (torch.stack(parts, dim=1) for parts in zip(*columns, strict=True))
    return Decoded(tokens=tokens, logprobs=logprobs, entropy=entropy)


class _ForwardBatch:
    """The rows being computed, their KV cache and what each forward takes besides the tokens: exactly what
    `generate` passes (transformers 5: the 2D mask, dropped when the prompts have no padding; position ids
    counted over the mask, where the forward takes them; logits of the last position only, where it can be
    told so), since another shape or mask path rounds the logits differently."""

    def __init__(self, model: nn.Module, prompt_mask: Tensor):
        self.model = model
        parameters = inspect.signature(model.forward).parameters
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        self.rows = torch.arange(prompt_mask.shape[0], device=prompt_mask.device)  # [R] indices into the batch
        mask = prompt_mask.long()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        self.positions = positions if "position_ids" in parameters else None  # [R, P], then [R, 1]
        self.mask = None if bool(prompt_mask.all()) else mask  # [R, P + steps so far]
        # Whether rows may leave the batch: every cache layer can be cut by row (the layers exist from the start).
        self.cuttable = all(type(layer).__name__ in _ROW_CUT_LAYERS for layer in self.cache.layers)

    def forward(self, inputs: Tensor) -> Tensor:
        """The float32 logits [R, V] of the next token after `inputs` [R, L] (the prompts, then one token)."""
        extra = self.extra if self.positions is None else {**self.extra, "position_ids": self.positions}
        outputs = self.model(input_ids=inputs, past_key_values=self.cache, attention_mask=self.mask, use_cache=True,
                             return_dict=True, **extra)
        if self.positions is not None:
            self.positions = self.positions[:, -1:] + 1
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        return outputs.logits[:, -1].to(dtype=torch.float32, copy=True)

    def keep(self, positions: Tensor) -> None:
        """Compute only the rows at `positions` [K] of the current batch from now on."""
        if len(positions) == len(self.rows):
            return
        self.cache.batch_select_indices(positions)
        self.rows = self.rows[positions]
        if self.positions is not None:
            self.positions = self.positions[positions]
        if self.mask is not None:
            self.mask = self.mask[positions]


def _step(process: Callable[[Tensor], Tensor], choose: Chooser, logits: Tensor, rows: Tensor, running: Tensor,
          step: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """One decode step: the batch's [N] next tokens (pad for the rows that ended), their log-probs and the
    entropies of the distributions they were drawn from (0 for the rows that ended)."""
    scores = process(logits)
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    # p log p with p = 0 (top-p removed the token, log p = -inf) contributes 0, not NaN.
    entropy = -(logprobs.exp() * logprobs.nan_to_num(neginf=0.0)).sum(dim=-1)
    chosen = choose(scores, rows, step)
    count = running.shape[0]
    tokens = torch.full((count,), pad_id, dtype=torch.long, device=logits.device)
    token_logprobs = torch.zeros(count, device=logits.device)
    token_entropy = torch.zeros(count, device=logits.device)
    tokens[rows] = chosen
    token_logprobs[rows] = logprobs.gather(1, chosen[:, None]).squeeze(1)
    token_entropy[rows] = entropy
    ended = ~running
    return tokens.masked_fill(ended, pad_id), token_logprobs.masked_fill(ended, 0.0), token_entropy.masked_fill(ended, 0.0)


def _all_finished(finished: bool, synced: bool) -> bool:
    """Whether the loop ends: this process's rows alone, or with `synced` every process's (one all-reduce
    per step, as generate's synced_gpus)."""
    if not synced:
        return finished
    return distributed.all_reduce_sum(0.0 if finished else 1.0) == 0.0


def _rows_to_keep(batch: _ForwardBatch, running: Tensor, synced: bool) -> Tensor:
    """Positions in the forward batch of the rows to compute next step: those still running, topped up
    with ended ones to `_FEWEST_ROWS` (or the batch, if smaller; with `synced` a process keeps stepping
    after its rows end). All of them where the cache cannot be cut by row."""
    if not batch.cuttable:
        return torch.arange(len(batch.rows), device=batch.rows.device)
    still = running[batch.rows]
    missing = min(len(batch.rows), _FEWEST_ROWS) - int(still.sum())
    if missing > 0:
        still[(~still).nonzero().squeeze(1)[:missing]] = True
    return still.nonzero().squeeze(1)


# CPU matrix products of 1-3 rows take another kernel than of 4 or more, which rounds differently (measured
# on this torch build); 4 or more rows give every row the bits it gets in the whole batch.
_FEWEST_ROWS = 4

# Cache layers whose state is one [rows, ...] tensor per key and value, which batch_select_indices cuts
# exactly (transformers.cache_utils); a layer with other states (linear attention's) may not be cut by row.
_ROW_CUT_LAYERS = frozenset({DynamicLayer.__name__, "DynamicSlidingWindowLayer"})


def multinomial_over_the_batch(count: int) -> Chooser:
    """Plain sampling as generate draws it: one torch.multinomial over all `count` rows of the batch, those
    that ended given a uniform placeholder, so the global generator advances as it would under generate
    (multinomial draws a [count, V] block of noise whatever the probabilities are)."""

    def choose(scores: Tensor, rows: Tensor, step: int) -> Tensor:
        probabilities = torch.full((count, scores.shape[1]), 1.0 / scores.shape[1], device=scores.device)
        probabilities[rows] = torch.softmax(scores, dim=-1)
        return torch.multinomial(probabilities, num_samples=1).squeeze(1)[rows]

    return choose
