"""Cross-entropy of the language-model head with one copy of the logits instead of three.

A batch of 4 x 128 tokens over KoGPT2's 51,200-token vocabulary has 105 MB of fp32 logits, and plain autograd keeps
the logits, their log-softmax and its gradient (at 8 x 512: 2.5 GB). Here the softmax runs a chunk of tokens at a
time and turns, in place, into the gradient of the logits, which is all that is kept (in bf16 under autocast).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .tied_grad import TiedGradient

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 8 * 2**20  # logits per chunk: 32 MB in fp32


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, tied) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        need_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # A frozen head (LoRA) gets no gradient: no [vocab, C] matmul, no .grad in the kept buffer, and no whole
        # d(loss)/d(logits) either: each chunk's turns into its rows of d(loss)/d(hidden) at once.
        ctx.weight_grad = ctx.needs_input_grad[1]
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        with torch.autocast(device, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            # d(loss)/d(logits), kept in the matmul dtype: half the size of fp32 logits under bf16
            grad_logits = torch.empty(len(targets), w.shape[0], dtype=dtype, device=hidden.device) \
                if ctx.weight_grad else None
            grad_hidden = torch.empty(len(targets), w.shape[1], dtype=dtype, device=hidden.device) \
                if need_grads and not ctx.weight_grad else None
            for start in range(0, len(targets), chunk):
                t = targets[start:start + chunk]
                logits = (h[start:start + chunk] @ w.t()).float()
                valid = t != IGNORE_INDEX
                rows = torch.arange(len(t), device=t.device)
                log_z = torch.logsumexp(logits, dim=-1)
                total += ((log_z - logits[rows, t.clamp(min=0)]) * valid).sum()
                if need_grads:
                    softmax = torch.exp(logits.sub_(log_z[:, None]))
                    softmax[rows, t.clamp(min=0)] -= 1
                    softmax.mul_(valid[:, None])
                    if grad_logits is not None:
                        grad_logits[start:start + chunk] = softmax
                    else:
                        torch.mm(softmax.to(dtype), w, out=grad_hidden[start:start + chunk])
            ctx.in_place = ctx.weight_grad and tied is not None and tied.usable_in_place(dtype)
            if ctx.in_place:  # the weight's gradient is added to its .grad in backward (see tied_grad.py)
                ctx.tied = tied
                ctx.save_for_backward((grad_logits @ w).to(hidden.dtype), grad_logits, h)
            elif ctx.weight_grad:  # two large matmuls, as fast as the plain head's backward
                ctx.save_for_backward((grad_logits @ w).to(hidden.dtype), (grad_logits.t() @ h).to(weight.dtype))
            elif need_grads:
                ctx.save_for_backward(grad_hidden.to(hidden.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        if ctx.in_place:
            grad_hidden, grad_logits, h = ctx.saved_tensors
            ctx.tied.accumulator().addmm_(grad_logits.t(), h, alpha=grad_total.item())
            return grad_hidden.mul_(grad_total), None, None, None
        if not ctx.weight_grad:
            (grad_hidden,) = ctx.saved_tensors
            return grad_hidden.mul_(grad_total), None, None, None
        grad_hidden, grad_weight = ctx.saved_tensors  # formed for this one backward: scale them in place
        return grad_hidden.mul_(grad_total), grad_weight.mul_(grad_total), None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         tied: TiedGradient | None = None) -> torch.Tensor:
    """sum over real targets of -log softmax(hidden @ weight.T)[target]; ``IGNORE_INDEX`` targets count nothing.

    hidden [tokens, C], weight [vocab, C], targets [tokens]. ``tied`` (the model's ``TiedGradient``) lets the
    weight's gradient be added to its ``.grad`` in place (tied_grad.py). The CPU's form: the chunks save gigabytes
    there; on a GPU the plain head and cross-entropy (``plain_cross_entropy``) are faster.
    """
    return _LinearCrossEntropy.apply(hidden, weight, targets, tied)


def plain_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same sum, from the whole logits (in the autocast dtype, the softmax in fp32)."""
    logits = torch.nn.functional.linear(hidden, weight)
    return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
