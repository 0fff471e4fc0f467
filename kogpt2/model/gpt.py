"""GPT-2 decoder in plain PyTorch, read top to bottom.

Weights are kept as ``nn.Linear`` ([out, in]); ``hf_layout.py`` translates to and from the Hugging Face
``GPT2LMHeadModel`` layout, so published KoGPT2 files load as they are and our weights load into ``transformers``.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils._triton import has_triton

from ..errors import KoGPT2Error
from .config import ACTIVATIONS, GPTConfig
from .head_loss import VOCAB_MULTIPLE, chunked_cross_entropy, linear_cross_entropy
from .kv_cache import KVCache
from .tied_grad import TiedGradient


@functools.cache
def compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention, compiled on CUDA: eager, it builds the whole score matrix; compiled, Triton writes one fused
    kernel. Inside the trainer's compiled model the outer graph takes it in; on the CPU only tests use it, eager."""
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        return compiled_flex_attention()(q, k, v, block_mask=block_mask)
    return flex_attention(q, k, v, block_mask=block_mask)  # [B, head, T, hs]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, layer: int, mask: torch.Tensor | BlockMask | None, cache: KVCache | None,
                input_pos: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # [B, head, T, hs]
        if cache is not None:
            k, v = cache.update(layer, input_pos, k, v)  # [B, head, slots, hs]
        if isinstance(mask, BlockMask):  # chat on CUDA: no attention dropout here (hidden_states chose it so)
            y = flex_attend(q, k, v, mask)  # [B, head, T, hs]
        else:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.approximate = ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, layer: int, mask, cache, input_pos) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer, mask, cache, input_pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        n = config.n_positions
        self.register_buffer("causal", torch.ones(n, n, dtype=torch.bool).tril(), persistent=False)  # [query, key]
        self.grad_checkpoint = False  # training may recompute each block in the backward pass instead of storing it
        # True: the tied weight's gradient goes through plain autograd and the head's loss through its traceable
        # chunked form, as on CUDA; the CPU's in-place paths (tied_grad.py, head_loss.py) break a torch.compile graph.
        self.plain_autograd = False
        # True: chat batches attend through FlexAttention with a block mask, as on CUDA, instead of SDPA with a dense
        # [batch, 1, time, time] mask (which rules out flash attention); tests set it to check that path on the CPU.
        self.flex_attention = False
        # The loss's head pads the vocabulary to a multiple of this, inside its computation only; None: by device
        # (CUDA: 128, whole tensor-core tiles; else 1). Parameters, checkpoints and forward's logits keep vocab_size.
        self.vocab_multiple: int | None = None
        self.tied_grad = TiedGradient(self.transformer.wte.weight)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [batch, time, vocab] for token ids [batch, time] (see ``hidden_states`` for the arguments); with
        ``targets`` [batch, time] instead the summed cross-entropy over those that are not ``IGNORE_INDEX``, computed
        without holding all the logits."""
        hidden = self.hidden_states(idx, input_pos, cache, attention_mask, segments)
        if targets is None:
            return self.lm_head(hidden)
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # [B*T, n_embd], [B*T]
        if self.plain_autograd or hidden.device.type == "cuda":
            multiple = self.vocab_multiple or (VOCAB_MULTIPLE if hidden.device.type == "cuda" else 1)
            return chunked_cross_entropy(hidden, self.lm_head.weight, targets, multiple)
        return linear_cross_entropy(hidden, self.lm_head.weight, targets, self.tied_grad)

    def hidden_states(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last layer's output [batch, time, n_embd], before the head.

        With a ``cache``, ``idx`` holds only the new tokens and ``input_pos`` [time] the cache slots they go to, or
        [batch, time] where each row is at its own position (a server's batch of unrelated requests): the caller owns
        the decoding position (as in gpt-fast), so a step's shapes never depend on a Python number and it can be
        captured as a CUDA graph. Each token attends to every slot up to its own.
        ``attention_mask`` [batch, slots] marks real tokens (1) and padding (0), for batched prompts of different
        lengths; positions then count each row's real tokens. ``segments`` [batch, time] numbers the independent
        examples packed into a row (chat): each starts again at position 0 and attends only to itself, so its
        logits are those it would have alone.
        """
        B, T = idx.shape
        if cache is None and T > self.config.n_positions:
            raise KoGPT2Error(f"sequence of {T} tokens is longer than the model's {self.config.n_positions} positions")
        if segments is not None:
            positions, mask = self._segment_positions_and_mask(segments, self._flex(idx.device))
        else:
            slots = cache.capacity if cache is not None else T
            input_pos = torch.arange(T, device=idx.device) if input_pos is None else input_pos  # [T]
            positions = input_pos.expand(B, T)  # [B, T]
            if attention_mask is not None:
                real = F.pad(attention_mask.long(), (0, slots - attention_mask.shape[1]))  # [B, slots]
                positions = (real.cumsum(-1) - 1).clamp(min=0)[:, input_pos]
            mask = None if cache is None and attention_mask is None else self._mask(input_pos, slots, attention_mask)
        x = self.transformer.drop(self._token_embeddings(idx) + self.transformer.wpe(positions))  # [B, T, n_embd]
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for layer, block in enumerate(self.transformer.h):
            if recompute:  # the random state is replayed, so dropout drops the same units: the same gradients
                x = torch.utils.checkpoint.checkpoint(block, x, layer, mask, cache, input_pos, use_reentrant=False)
            else:
                x = block(x, layer, mask, cache, input_pos)
        return self.transformer.ln_f(x)

    def _token_embeddings(self, idx: torch.Tensor) -> torch.Tensor:
        weight = self.transformer.wte.weight
        if weight.device.type == "cpu" and weight.requires_grad and torch.is_grad_enabled() and not self.plain_autograd:
            return self.tied_grad.embedding(idx)
        return self.transformer.wte(idx)

    def _flex(self, device: torch.device) -> bool:
        """FlexAttention for chat batches on CUDA where Triton can build its kernel (or where a test asks), unless
        attention dropout is on: it has none, and a run's dropout must not silently change."""
        dropping = self.training and self.config.dropout > 0
        return (self.flex_attention or device.type == "cuda" and has_triton()) and not dropping

    @staticmethod
    def _segment_positions_and_mask(segments: torch.Tensor,
                                    flex: bool) -> tuple[torch.Tensor, torch.Tensor | BlockMask]:
        """Positions counted from each segment's first token, and a causal mask that stays inside a segment: dense
        for SDPA, or made once per forward as FlexAttention's block mask, which every layer shares and which skips
        the blocks between segments."""
        B, T = segments.shape
        steps = torch.arange(T, device=segments.device)
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        first = torch.cummax(torch.where(starts, steps, 0), dim=1).values
        if flex:
            def same_segment_causal(b, h, q, kv):
                return (q >= kv) & (segments[b, q] == segments[b, kv])

            return steps - first, create_block_mask(same_segment_causal, B, None, T, T, device=segments.device)
        causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
        return steps - first, causal & (segments[:, None, :, None] == segments[:, None, None, :])

    def _mask(self, input_pos: torch.Tensor, slots: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[batch or 1, 1, time, slots], added to the attention scores: 0 where a query sees a slot (those up to its
        own, less padding), -inf elsewhere. Made once per forward in the weights' dtype: from a boolean mask
        attention would make it again in every layer (12 small kernels more per decoding step)."""
        mask = self.causal[input_pos, :slots].unsqueeze(-3)  # [1 or B, 1, T, slots] (broadcast: [1, T, slots])
        if attention_mask is not None:
            real = F.pad(attention_mask.bool(), (0, slots - attention_mask.shape[1]))  # [B, slots]
            # A padding query with no real key before it would softmax over nothing (NaN): let it see itself.
            own = torch.arange(slots, device=input_pos.device) == input_pos[:, None]  # [T, slots]
            mask = (mask & real[:, None, None, :]) | own
        dtype = self.lm_head.weight.dtype
        return torch.where(mask, torch.zeros((), dtype=dtype), torch.full((), float("-inf"), dtype=dtype))

    def kv_cache(self, batch_size: int, slots: int) -> KVCache:
        """An empty cache for ``batch_size`` rows of up to ``slots`` tokens, on the weights' device and dtype."""
        c, weight = self.config, self.lm_head.weight
        return KVCache(c.n_layer, c.n_head, c.n_embd // c.n_head, batch_size, slots, weight.device, weight.dtype)

    def set_dropout(self, p: float) -> None:
        """Change every dropout rate (fine-tuning often wants another than pretraining's)."""
        self.config.dropout = p
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif isinstance(module, CausalSelfAttention):
                module.dropout = p

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
