"""AdamW with weight decay on matrices only, and its schedule: linear warmup, then cosine decay."""
from __future__ import annotations

import math

import torch


def steps_per_epoch(blocks: int, global_batch: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over ``blocks`` (the last batch and the last accumulation may be short)."""
    return math.ceil(math.ceil(blocks / global_batch) / grad_accum)


def warmup_steps(warmup: int, total_steps: int) -> int:
    """``warmup`` optimizer steps, where -1 means 5% of the run."""
    return warmup if warmup >= 0 else max(1, total_steps // 20)


def learning_rate(step: int, lr: float, warmup: int, total_steps: int) -> float:
    """Linear warmup over ``warmup`` steps (-1: 5% of the run), then cosine decay to a tenth of ``lr`` at the last
    step."""
    warmup = warmup_steps(warmup, total_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(parameters: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with ``weight_decay`` on matrices and embeddings only, not on biases or norms."""
    decay = [p for p in parameters if p.dim() >= 2]
    no_decay = [p for p in parameters if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = parameters[0].device.type in ("cpu", "cuda")  # one kernel: ~4x faster than foreach on CPU
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)
