"""Forward passes over packed blocks: the loss of some blocks under the run's precision, and the mean loss over a
data set (validation during training, and ``python -m kogpt2.evaluate``)."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ..corpus.packing import Batch, PackedData
from ..model.gpt import GPT
from ..runtime import sum_dtype

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
    return nullcontext()


def batch_loss_sum(model, batch: Batch, device: torch.device, precision: str) -> torch.Tensor:
    """Summed cross-entropy over the targets of a batch that count (left on the device: no host sync).

    ``model`` is the GPT or its DistributedDataParallel wrapper (whose forward is what syncs gradients)."""
    inputs, targets, segments = (to_device(t, device) for t in (batch.inputs, batch.targets, batch.segments))
    with autocast(device, precision):
        return model(inputs, targets=targets, segments=segments)


def to_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """To a GPU through pinned memory, without waiting for the copy (the GPU keeps the order)."""
    if tensor is None:
        return None
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: GPT, data: PackedData, batch_size: int, precision: str, progress: bool = False) -> float:
    """Mean cross-entropy per target that counts (its exp is the perplexity)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=sum_dtype(device), device=device)
    for start in tqdm(range(0, len(data.blocks), batch_size), desc="evaluating", unit="batch", disable=not progress):
        total += batch_loss_sum(model, data.batch(torch.arange(start, min(start + batch_size, len(data.blocks)))),
                                device, precision)
    model.train(was_training)
    return total.item() / max(1, int(data.real_tokens.sum()))
