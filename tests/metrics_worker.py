"""The real `train_step` on hand-made tensors, without a model: test_metrics.py imports it, and runs it under
torchrun (2 gloo processes) to check how ranks combine.

The student is a table: `prompt_ids[:, 0]` holds each row's index into fixed lS / entropy / top-k tables, and
one scalar parameter `shift` (0) is added to the log-probs so that the loss has a gradient. `student_forward`
is replaced by the table lookup; everything after it (objective, aggregation, metric combining across
micro-batches and ranks, gradient all-reduce, clipping, optimizer step) is the library's own code.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import opd.train
from opd.runtime import distributed
from opd.train import StepSettings, TrainState, select_rows, train_step
from opd.types import StudentOutputs

LR = 0.25


class TableStudent(nn.Module):
    def __init__(self, logprobs, entropy, topk_logprobs):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros((), dtype=torch.float32))
        self.logprobs, self.entropy, self.topk_logprobs = logprobs, entropy, topk_logprobs
        self.device = torch.device("cpu")


def table_forward(model, batch, teacher, objective, settings) -> StudentOutputs:
    rows = batch.prompt_ids[:, 0]
    return StudentOutputs(logprobs=model.logprobs[rows] + model.shift, entropy=model.entropy[rows],
                          topk_logprobs=model.topk_logprobs[rows] + model.shift)


def table_train_step(batch, teacher, tables, objective, micro_batch_size: int) -> dict:
    """train_step on `batch` (this rank's rows) with the table student; returns the step's metrics."""
    model = TableStudent(*tables)
    state = TrainState(student=model, optimizer=torch.optim.SGD([model.shift], lr=LR))
    settings = StepSettings(aggregation="token-mean", micro_batch_size=micro_batch_size, temperature=1.0,
                            chunk_size=5, max_grad_norm=None)
    real_forward, opd.train.student_forward = opd.train.student_forward, table_forward
    try:
        return train_step(state, batch, teacher, objective, settings)
    finally:
        opd.train.student_forward = real_forward


def main(inputs_path: str, output_path: str) -> None:
    torch.set_num_threads(1)
    distributed.init_from_environment()
    batch, teacher, tables, objective, shares, micro_batch_size = torch.load(inputs_path, weights_only=False)
    start, stop = shares[distributed.rank()]
    metrics = table_train_step(select_rows(batch, slice(start, stop)), select_rows(teacher, slice(start, stop)),
                               tables, objective, micro_batch_size)
    if distributed.is_main():
        torch.save(metrics, output_path)
    distributed.finish(True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
