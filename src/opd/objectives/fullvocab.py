"""Full-vocabulary losses between student and teacher, chunk by chunk (GKD's generalized JSD).

Like `scoring.py`, nothing here holds `[tokens, vocab]` for a whole batch: the forward pass keeps only the
per-token losses, and the backward pass recomputes each chunk's student and teacher logits, differentiates
the reference formula (`functional.generalized_jsd`) on that chunk, and projects the gradient back onto the
student's hidden states and output head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.functional import generalized_jsd
from opd.scoring import chunked_head_backward, head_logits


class _ChunkedGeneralizedJsd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, beta, temperature, chunk_size):
        losses = []
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            student_logits = head_logits(hidden[start:stop], weight, bias)
            teacher_logits = head_logits(teacher_hidden[start:stop], teacher_weight, teacher_bias)
            losses.append(generalized_jsd(student_logits, teacher_logits, beta, temperature))
        ctx.save_for_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)
        ctx.settings = (beta, temperature, chunk_size)
        if not losses:
            return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias = ctx.saved_tensors
        beta, temperature, chunk_size = ctx.settings

        def grad_logits_of(start: int, stop: int) -> Tensor:
            teacher_logits = head_logits(teacher_hidden[start:stop], teacher_weight, teacher_bias)
            with torch.enable_grad():
                student_logits = head_logits(hidden[start:stop].detach(), weight.detach(),
                                             None if bias is None else bias.detach())
                student_logits.requires_grad_(True)
                loss = generalized_jsd(student_logits, teacher_logits, beta, temperature)
                (grad_logits,) = torch.autograd.grad(loss, student_logits, grad_loss[start:stop].to(loss.dtype))
            return grad_logits

        grads = chunked_head_backward(hidden, weight, bias, grad_logits_of, chunk_size=chunk_size,
                                      needs=(True, True, True), dtype=torch.promote_types(weight.dtype, torch.float32))
        return *grads, None, None, None, None, None, None


def chunked_generalized_jsd(
    hidden: Tensor,  # [M, H] student, with gradient
    weight: Tensor,  # [V, H]
    bias: Tensor | None,
    teacher_hidden: Tensor,  # [M, H_teacher]
    teacher_weight: Tensor,  # [V, H_teacher]
    teacher_bias: Tensor | None,
    *,
    beta: float,
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> Tensor:  # [M]
    """Per-token generalized JSD between student and teacher full distributions, O(chunk * V) memory."""
    if weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"full-vocabulary losses need equal output widths: student {weight.shape[0]}, teacher {teacher_weight.shape[0]}"
        )
    return _ChunkedGeneralizedJsd.apply(hidden, weight, bias, teacher_hidden.detach(), teacher_weight.detach(),
                                        None if teacher_bias is None else teacher_bias.detach(), beta, temperature,
                                        chunk_size)
