"""AdamW with weight decay on matrices only, and its schedule: linear warmup, then cosine decay."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import GPT
    from .train import TrainSettings


def steps_per_epoch(blocks: int, global_batch: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over ``blocks`` (the last batch and the last accumulation may be short)."""
    return math.ceil(math.ceil(blocks / global_batch) / grad_accum)


def warmup_steps(warmup: int, total_steps: int) -> int:
    """``warmup`` optimizer steps, where -1 means 5% of the run."""
    return warmup if warmup >= 0 else max(1, total_steps // 20)


def learning_rate(step: int, settings: TrainSettings, total_steps: int) -> float:
    """Linear warmup, then cosine decay to a tenth of ``lr`` at the last step."""
    warmup = warmup_steps(settings.warmup, total_steps)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: GPT, settings: TrainSettings) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings; not biases or norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type in ("cpu", "cuda")  # one kernel: ~4x faster than foreach on CPU
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999), fused=fused or None)
