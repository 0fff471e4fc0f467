"""Keys and values kept between decoding steps: one token of work per step instead of the whole text."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import GPTConfig


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated so a step only writes one slot."""

    decoding = False  # see StaticKVCache

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype) -> None:
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, 2, batch_size, config.n_head, max_len, head_dim)
        self.buffer = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.buffer.shape[-2]

    def restart(self) -> None:
        """Forget every token (the buffer is kept: a captured graph relies on its address)."""
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[-2]
        self.buffer[layer, 0, :, :, self.length:end] = k
        self.buffer[layer, 1, :, :, self.length:end] = v
        return self.buffer[layer, 0, :, :, :end], self.buffer[layer, 1, :, :, :end]


class StaticKVCache(KVCache):
    """A KV cache whose decoding steps all have one shape: after the prompt (written as by ``KVCache``), each step
    writes its token at ``position``, a tensor, and attends to every slot up to it. Nothing in a step depends on a
    Python number, so a step can be captured once as a CUDA graph and replayed for every token."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype) -> None:
        super().__init__(config, batch_size, max_len, device, dtype)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)

    def start_decoding(self) -> None:
        self.position.fill_(self.length)
        self.decoding = True

    def advance(self) -> None:
        """After a decoding step: the next token goes in the next slot."""
        self.position += 1
        self.length += 1

    def restart(self) -> None:
        super().restart()
        self.decoding = False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.decoding:
            return super().update(layer, k, v)
        self.buffer[layer, 0].index_copy_(2, self.position, k)
        self.buffer[layer, 1].index_copy_(2, self.position, v)
        return self.buffer[layer, 0], self.buffer[layer, 1]

    def visible(self) -> torch.Tensor:
        """[1, 1, 1, slots]: the slots written so far, this step's included."""
        return (self.slots <= self.position).view(1, 1, 1, -1)
