"""Cross-entropy of the language-model head without ever holding all the logits.

A batch of 4 x 128 tokens over KoGPT2's 51,200-token vocabulary has 105 MB of fp32 logits, and autograd keeps
three tensors that size; at 8 x 512 it is 2.5 GB. Here the head runs a chunk of tokens at a time and the gradients
are formed on the spot, so only one chunk of logits exists at any moment.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 8 * 2**20  # logits per chunk: 32 MB in fp32


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        need_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_grads else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grads else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (h @ weight.t()).float()  # under autocast the matmul runs in bf16
            valid = t != IGNORE_INDEX
            rows = torch.arange(len(t), device=t.device)
            log_z = torch.logsumexp(logits, dim=-1)
            total += ((log_z - logits[rows, t.clamp(min=0)]) * valid).sum()
            if need_grads:
                grad_logits = torch.exp(logits.sub_(log_z[:, None]))  # softmax, in place of the logits
                grad_logits[rows, t.clamp(min=0)] -= 1
                grad_logits *= valid[:, None]
                grad_hidden[start:start + chunk] = grad_logits @ weight.to(grad_logits.dtype)
                grad_weight += grad_logits.t() @ h.to(grad_logits.dtype)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, (grad_weight * grad_total).to(ctx.weight_dtype), None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum over real targets of -log softmax(hidden @ weight.T)[target]; ``IGNORE_INDEX`` targets count nothing.

    hidden [tokens, C], weight [vocab, C], targets [tokens].
    """
    return _LinearCrossEntropy.apply(hidden, weight, targets)
