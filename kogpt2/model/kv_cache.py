"""Keys and values kept between decoding steps: one token of work per step instead of the whole text."""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer in preallocated slots. It holds no position of its own: each call says which
    slots its tokens go to (``input_pos``), so a step reads and writes the same buffers whatever the position, and a
    CUDA graph captured once replays for every token."""

    def __init__(self, n_layer: int, n_head: int, head_dim: int, batch_size: int, slots: int, device,
                 dtype: torch.dtype) -> None:
        self.buffer = torch.zeros(n_layer, 2, batch_size, n_head, slots, head_dim, device=device, dtype=dtype)

    @classmethod
    def over(cls, buffer: torch.Tensor) -> "KVCache":
        """A cache over part of another's buffer (a view: writes land in the other's storage)."""
        cache = cls.__new__(cls)
        cache.buffer = buffer
        return cache

    def view(self, rows: int, slots: int) -> "KVCache":
        """The first ``rows`` rows and ``slots`` slots, sharing this cache's storage: a batch that keeps its live rows
        first steps over them alone, attending to no slot past the longest row."""
        return KVCache.over(self.buffer[:, :, :rows, :, :slots])

    @property
    def capacity(self) -> int:
        return self.buffer.shape[-2]

    @property
    def rows(self) -> int:
        return self.buffer.shape[2]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` [batch, head, time, head_dim] at slots ``input_pos``: [time], the same for every row, or
        [batch, time], each row its own; return every slot's."""
        keys, values = self.buffer[layer, 0], self.buffer[layer, 1]  # [batch, head, slots, head_dim]
        if input_pos.dim() == 1:
            keys.index_copy_(2, input_pos, k)
            values.index_copy_(2, input_pos, v)
        else:
            index = input_pos[:, None, :, None].expand_as(k)  # [batch, head, time, head_dim]
            keys.scatter_(2, index, k)
            values.scatter_(2, index, v)
        return keys, values

    def copy_row(self, source: int, target: int, slots: int, source_cache: "KVCache | None" = None) -> None:
        """Row ``source``'s first ``slots`` slots (of ``source_cache``, else of this cache) into row ``target``: a
        prefilled prompt joining a batch, or a batch closing the gap a row left."""
        origin = self if source_cache is None else source_cache
        self.buffer[:, :, target, :, :slots] = origin.buffer[:, :, source, :, :slots]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Only these batch rows go on (samples that ended leave the batch)."""
        self.buffer = self.buffer.index_select(2, rows)
