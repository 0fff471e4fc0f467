"""LoRA (Hu et al., 2021): a trained low-rank update ``scaling * B @ A`` beside each chosen projection's frozen weight,
so a run trains and stores about 1% of the parameters. For decoding the update is merged into the weight once, and
the model is a plain GPT again: no extra matmuls per token.

A is [rank, in] and B [out, rank], as PEFT's ``lora_A.weight`` and ``lora_B.weight`` for Hugging Face's Conv1D
(``fan_in_fan_out=True``): our [out, in] weight takes ``B @ A`` as it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..defaults import LORA_PROJECTIONS
from ..errors import KoGPT2Error
from .gpt import GPT


@dataclass(frozen=True)
class LoraSettings:
    """The adapters' shape: their rank, ``alpha`` (the update is scaled by alpha / rank), the dropout on their input
    and the projections they sit beside (names in a block: ``attn.c_attn``, ``mlp.c_fc``...)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in LORA_PROJECTIONS]
        if unknown or not self.targets:
            raise KoGPT2Error(f"LoRA layers must be some of {', '.join(LORA_PROJECTIONS)}, not "
                              f"{', '.join(unknown) or 'none'}")
        if self.rank < 1:
            raise KoGPT2Error(f"the LoRA rank must be at least 1, not {self.rank}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, values: dict) -> "LoraSettings":
        return cls(int(values["rank"]), float(values["alpha"]), float(values["dropout"]), tuple(values["targets"]))


class LoRALinear(nn.Module):
    """A frozen projection (the base's own ``weight`` and ``bias``, under the same names) plus the trained update.
    B starts at zero, so training starts from the base model exactly."""

    def __init__(self, base: nn.Linear, settings: LoraSettings) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(settings.rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, settings.rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT
        self.scaling = settings.scaling
        self.dropout = settings.dropout  # a number, not an nn.Dropout: GPT.set_dropout leaves it alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scaling multiplies the [.., rank] activations, not the [.., out] update; no dropout call at rate 0
        # (on the CPU each mask costs milliseconds).
        dropped = F.dropout(x, self.dropout, self.training) if self.dropout else x
        low_rank = F.linear(dropped, self.lora_A) * self.scaling
        return F.linear(x, self.weight, self.bias).add_(F.linear(low_rank, self.lora_B))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The plain projection with the update added to its weight."""
        self.weight += (self.lora_B.float() @ self.lora_A.float()).mul_(self.scaling).to(self.weight.dtype)
        linear = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def adapted_layers(model: GPT) -> dict[str, LoRALinear]:
    """Each adapted projection by its name in the model (``transformer.h.0.attn.c_attn``)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def add_adapters(model: GPT, settings: LoraSettings) -> None:
    """Freeze every base parameter (the tied embedding and head too) and put fresh adapters beside the targets."""
    model.requires_grad_(False)
    for block in model.transformer.h:
        for target in settings.targets:
            parent, name = target.split(".")
            owner = getattr(block, parent)
            setattr(owner, name, LoRALinear(getattr(owner, name), settings))


def adapter_state(model: GPT) -> dict[str, torch.Tensor]:
    """The adapters' tensors alone, named ``<projection>.lora_A`` / ``.lora_B``."""
    return {f"{name}.{part}": getattr(layer, part).detach()
            for name, layer in adapted_layers(model).items() for part in ("lora_A", "lora_B")}


def load_adapter_state(model: GPT, state: dict[str, torch.Tensor]) -> None:
    """Load adapters saved by ``adapter_state`` into a model with the same adapters; a mismatch is named."""
    expected = adapter_state(model)
    if set(expected) != set(state):
        missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise KoGPT2Error(f"the adapters do not fit their settings: missing {', '.join(missing[:3]) or 'none'}, "
                          f"unknown {', '.join(unknown[:3]) or 'none'}")
    with torch.no_grad():
        for name, tensor in expected.items():
            if state[name].shape != tensor.shape:
                raise KoGPT2Error(f"the adapter {name} has shape {tuple(state[name].shape)}, its settings need "
                                  f"{tuple(tensor.shape)}")
            tensor.copy_(state[name])


def merge_adapters(model: GPT) -> None:
    """Fold every adapter into its projection's weight: the model decodes at the plain model's speed, and trains as
    a plain model again (every parameter trainable) if a new run starts from it."""
    for name, layer in adapted_layers(model).items():
        owner_name, attribute = name.rsplit(".", 1)
        setattr(model.get_submodule(owner_name), attribute, layer.merged())
    model.requires_grad_(True)
