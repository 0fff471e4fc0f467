"""Cross-entropy of the language-model head without holding every logit in fp32.

A batch of 4 x 128 tokens over KoGPT2's 51,200-token vocabulary has 105 MB of fp32 logits, and plain autograd keeps
the logits, their log-softmax and its gradient (at 8 x 512: 2.5 GB; at 16 x 1024 under bf16 autocast 1.7 GB of
logits, 3.4 GB for their fp32 copy and 3.4 GB for the log-softmax). Here the softmax runs a chunk of tokens at a time
and turns, in place, into the gradient of the logits. Two forms: the CPU's eager one (``linear_cross_entropy``)
keeps that gradient, for two large matmuls and the tied weight's in-place gradient; the one CUDA and torch.compile
run (``chunked_cross_entropy``) keeps no [tokens, vocab] tensor at all and traces as plain tensor code.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .tied_grad import TiedGradient

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 8 * 2**20  # logits per chunk on the CPU: 32 MB in fp32
# Tokens per chunk on CUDA and under torch.compile: whole 128-row tiles for the matmuls, 420 MB of fp32 softmax at
# 51,200 words, and few chunks (8 at 16 x 1024) for the compiled graph, which unrolls the loop.
GPU_CHUNK_TOKENS = 2048
VOCAB_MULTIPLE = 128  # CUDA pads the head's vocabulary to this (tensor-core tiles): v1's 50,000 to 50,048


def padded_vocab(vocab: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that holds ``vocab`` words."""
    return -(-vocab // multiple) * multiple


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor,
                need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed cross-entropy of a chunk's fp32 logits [rows, vocab] and, if ``need_grad``, its gradient with
    respect to them, written over the logits (``IGNORE_INDEX`` rows: zero)."""
    valid = targets != IGNORE_INDEX  # [rows]
    rows = torch.arange(len(targets), device=targets.device)
    log_z = torch.logsumexp(logits, dim=-1)  # [rows]
    loss = ((log_z - logits[rows, targets.clamp(min=0)]) * valid).sum()
    if not need_grad:
        return loss, None
    softmax = logits.sub_(log_z[:, None]).exp_()  # [rows, vocab]
    softmax[rows, targets.clamp(min=0)] -= 1
    return loss, softmax.mul_(valid[:, None])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, tied,
                grads: bool) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        need_grads = grads and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        # A frozen head (LoRA) gets no gradient: no [vocab, C] matmul, no .grad in the kept buffer, and no whole
        # d(loss)/d(logits) either: each chunk's turns into its rows of d(loss)/d(hidden) at once.
        ctx.weight_grad = grads and ctx.needs_input_grad[1]
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
                loss, softmax = _chunk_loss((h[start:start + chunk] @ w.t()).float(), targets[start:start + chunk],
                                            need_grads)
                total += loss
                if need_grads:
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
            return grad_hidden.mul_(grad_total), None, None, None, None
        if not ctx.weight_grad:
            (grad_hidden,) = ctx.saved_tensors
            return grad_hidden.mul_(grad_total), None, None, None, None
        grad_hidden, grad_weight = ctx.saved_tensors  # formed for this one backward: scale them in place
        return grad_hidden.mul_(grad_total), grad_weight.mul_(grad_total), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         tied: TiedGradient | None = None) -> torch.Tensor:
    """sum over real targets of -log softmax(hidden @ weight.T)[target]; ``IGNORE_INDEX`` targets count nothing.

    hidden [tokens, C], weight [vocab, C], targets [tokens]. ``tied`` (the model's ``TiedGradient``) lets the
    weight's gradient be added to its ``.grad`` in place (tied_grad.py). The CPU's eager form: it keeps
    d(loss)/d(logits) [tokens, vocab] for two large matmuls, and Dynamo cannot trace the in-place gradient
    (``chunked_cross_entropy`` is the compiled and CUDA form).
    """
    # grad mode is passed in: a Function's forward always runs without it, and needs_input_grad ignores it, so
    # evaluation (under no_grad) would form every gradient
    return _LinearCrossEntropy.apply(hidden, weight, targets, tied, torch.is_grad_enabled())


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_multiple: int,
                grads: bool):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        vocab = weight.shape[0]
        extra = padded_vocab(vocab, vocab_multiple) - vocab
        with torch.autocast(device, enabled=False):
            h = hidden.to(dtype)
            w = F.pad(weight.to(dtype), (0, 0, 0, extra)) if extra else weight.to(dtype)  # [padded vocab, C]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = []
            grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=hidden.device) \
                if grads and ctx.needs_input_grad[1] else None  # summed over the chunks in fp32, as one matmul would
            need_grad = grads and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
            for start in range(0, len(targets), GPU_CHUNK_TOKENS):
                h_chunk = h[start:start + GPU_CHUNK_TOKENS]  # [rows, C]
                logits = (h_chunk @ w.t()).float()  # [rows, padded vocab]
                if extra:
                    logits[:, vocab:] = float("-inf")  # padding is never a word: no share of the softmax
                loss, grad_logits = _chunk_loss(logits, targets[start:start + GPU_CHUNK_TOKENS], need_grad)
                total += loss
                if need_grad:
                    grad_logits = grad_logits.to(dtype)  # [rows, padded vocab]
                    grad_hidden.append(grad_logits @ w)  # [rows, C]
                    if grad_weight is not None:
                        # [padded vocab, C]; in fp16 a frequent target's sum over the chunk's rows can pass 65,504
                        # whatever the loss scale (then every step is skipped): that product is made in fp32
                        grad_weight += grad_logits.t().float() @ h_chunk.float() if dtype == torch.float16 \
                            else (grad_logits.t() @ h_chunk).float()
            if need_grad:
                ctx.save_for_backward(torch.cat(grad_hidden).to(hidden.dtype),
                                      None if grad_weight is None else grad_weight[:vocab].to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, None if grad_weight is None else grad_weight * grad_total, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          vocab_multiple: int = 1) -> torch.Tensor:
    """The same sum as ``linear_cross_entropy``, in the form CUDA and torch.compile run: one graph, no breaks.

    Each chunk of ``GPU_CHUNK_TOKENS`` rows makes its logits, its fp32 softmax and at once, in the forward pass, its
    rows of d(loss)/d(hidden) and its share of d(loss)/d(weight): nothing [tokens, vocab] outlives a chunk, and the
    backward only scales the two. Recomputing each chunk's logits in the backward would keep as little but cost a
    fourth head matmul (a third more of the head's FLOPs: 9% more for a whole KoGPT2 step); this costs the three of
    the plain head and cross-entropy and a [vocab, C] fp32 add per chunk, while the [tokens, vocab] fp32 copies
    (logits, log-softmax, its gradient) that plain autograd writes and reads are gone. With ``vocab_multiple`` > 1
    the weight is padded, inside this computation only, with zero rows to a multiple of it, whose logits are
    masked out of the softmax: the matmuls run on whole tensor-core tiles, and the parameter, its gradient and the
    loss are those of the real vocabulary.
    """
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, vocab_multiple, torch.is_grad_enabled())
