"""The gradient of KoGPT2's tied weight (token embedding = head), on the CPU, without fresh 157 MB tensors.

Plain autograd makes, every step, a fresh [vocab, n_embd] tensor for the head's gradient, another for the
embedding's, and a third for their sum. On the CPU each fresh one costs 160-230 ms of page faults in a 2.7 s step
(bench/README.md). Here both gradients go into one buffer kept between steps: written in place as the weight's
``.grad`` in a single process; under DistributedDataParallel, whose hooks need the gradient to flow through
autograd, the embedding's is returned in the kept buffer instead (the head's reaches autograd first, so the buffer
never becomes the ``.grad``; checked all the same).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class TiedGradient:
    def __init__(self, weight: torch.nn.Parameter) -> None:
        self.weight = weight
        self.in_place = False  # set by the trainer for single-process runs
        self.kept: torch.Tensor | None = None

    def _fresh_kept(self, dtype: torch.dtype) -> torch.Tensor:
        kept, grad = self.kept, self.weight.grad
        if kept is None or kept.shape != self.weight.shape or kept.dtype != dtype or \
                (grad is not None and grad.data_ptr() == kept.data_ptr()):
            self.kept = torch.empty(self.weight.shape, dtype=dtype, device=self.weight.device)
        return self.kept.zero_()

    def accumulator(self) -> torch.Tensor:
        """The weight's ``.grad``, made from the kept buffer (zeroed) when the optimizer has just cleared it."""
        if self.weight.grad is None:
            self.weight.grad = self._fresh_kept(self.weight.dtype)
        return self.weight.grad

    def usable_in_place(self, dtype: torch.dtype) -> bool:
        return self.in_place and self.weight.device.type == "cpu" and dtype == self.weight.dtype

    def embedding(self, idx: torch.Tensor) -> torch.Tensor:
        return _Embedding.apply(self.weight, idx, self)


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, idx: torch.Tensor, tied: TiedGradient) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.tied = tied
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (idx,) = ctx.saved_tensors
        tied = ctx.tied
        rows, grads = idx.reshape(-1), grad_out.reshape(-1, tied.weight.shape[1])
        if tied.usable_in_place(grad_out.dtype):
            tied.accumulator().index_add_(0, rows, grads)
            return None, None, None
        return tied._fresh_kept(grad_out.dtype).index_add_(0, rows, grads), None, None
