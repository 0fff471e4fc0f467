"""Autoregressive generation with the KV cache (one token of work per step), and streaming text out of ids."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .errors import KoGPT2Error
from .model import GPT, KVCache
from .sampling import apply_repetition_penalty, block_repeated_ngrams, sample_next
from .tokenizer import Tokenizer


@dataclass
class SamplingSettings:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0
    text_size: int = 100  # most new tokens
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise KoGPT2Error(f"temperature must be 0 (greedy) or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise KoGPT2Error(f"top_p must be in (0, 1], not {self.top_p}")
        if self.repetition_penalty <= 0:
            raise KoGPT2Error(f"repetition_penalty must be positive, not {self.repetition_penalty}")
        if self.text_size < 1:
            raise KoGPT2Error(f"text_size must be at least 1, not {self.text_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def never_generated(tokenizer: Tokenizer) -> list[int]:
    """Tokens that only ever mean noise in output: unknown, padding, and a start token distinct from the end."""
    return sorted({tokenizer.unk_id, tokenizer.pad_id} | ({tokenizer.bos_id} - {tokenizer.eos_id}))


def _onednn_linear():
    """oneDNN's matmul on the model's own weights (no repacking, no copy), or None where this torch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


ONEDNN_LINEAR = _onednn_linear()


class _LinearOnOneDNN(torch.overrides.TorchFunctionMode):
    """Sends the model's ``F.linear`` calls to oneDNN."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        out = ONEDNN_LINEAR(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
        return out.view(*x.shape[:-1], weight.shape[0])


class DecodingStep:
    """Runs the model for new tokens and returns the last position's logits, on the CPU kernels that are fastest
    for decoding (measured on the project machines, bench/README.md):

    - fp32: every linear layer and the head on oneDNN's matmul: whole steps 1.45x faster than through ATen's MKL
      calls for one sample, 1.6x for eight (AMD EPYC);
    - bf16/fp16: ATen's own kernels for one sample (through oneDNN a step is 1.6x slower), oneDNN for batches.
    Only the last position's logits are computed, so a long prompt costs no [prompt, vocab] logits.
    """

    def __init__(self, model: GPT, batch: int) -> None:
        weight = model.lm_head.weight
        cpu = weight.device.type == "cpu"
        self.model = model
        self.fp32_onednn = cpu and weight.dtype == torch.float32 and ONEDNN_LINEAR is not None
        self.aten_only = cpu and batch == 1 and weight.dtype != torch.float32

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        with self._kernels():
            return self.model.lm_head(self.model.hidden_states(tokens, cache=cache)[:, -1])

    def _kernels(self):
        if self.fp32_onednn:
            return _LinearOnOneDNN()
        if self.aten_only:
            return torch.backends.mkldnn.flags(enabled=False, deterministic=None, allow_tf32=None, fp32_precision=None)
        return nullcontext()


@torch.no_grad()
def generate_ids(model: GPT, prompt_ids: list[int], settings: SamplingSettings, eos_id: int, num_samples: int = 1,
                 generator: torch.Generator | None = None, suppress: list[int] = ()) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each sample (None once a sample has ended at ``eos_id``).

    ``suppress`` lists token ids never to produce (see ``never_generated``).
    Past the model's positions the context slides: the cache is rebuilt from the newest half of the text.
    """
    if not prompt_ids:
        raise KoGPT2Error("a prompt needs at least one token")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    window = model.config.n_positions
    keep = window // 2
    rows = [list(prompt_ids[-window:]) for _ in range(num_samples)]
    cache = KVCache(model.config, num_samples, window, device, dtype)
    step_model = DecodingStep(model, num_samples)
    logits = step_model(torch.tensor(rows, device=device), cache)
    done = [False] * num_samples
    for _ in range(settings.text_size):
        if settings.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, torch.tensor(rows, device=device), settings.repetition_penalty)
        logits = block_repeated_ngrams(logits, rows, settings.no_repeat_ngram)
        if suppress:
            logits[:, list(suppress)] = float("-inf")
        tokens = sample_next(logits, settings.temperature, settings.top_k, settings.top_p, generator).tolist()
        step = []
        for i, token in enumerate(tokens):
            if done[i]:
                step.append(None)
                continue
            done[i] = token == eos_id
            step.append(None if done[i] else token)
        yield step
        if all(done):
            return
        for row, token in zip(rows, tokens):
            row.append(token)
        if cache.length == window:
            cache = KVCache(model.config, num_samples, window, device, dtype)
            logits = step_model(torch.tensor([row[-keep:] for row in rows], device=device), cache)
        else:
            logits = step_model(torch.tensor([[t] for t in tokens], device=device), cache)


class TextStream:
    """Turns a growing list of generated ids into printable text pieces.

    Decodes prompt + continuation together (so the first word keeps its space) and holds back an incomplete
    character, so a half-decoded syllable is never printed.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.base = tokenizer.decode(self.prompt_ids)
        self.ids: list[int] = []
        self.text = ""  # the continuation printed so far

    def push(self, token: int) -> str:
        """Add one id; return the text that became printable."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.prompt_ids + self.ids)
        continuation = full[len(self.base):] if full.startswith(self.base) else self.tokenizer.decode(self.ids)
        continuation = continuation.rstrip("\ufffd")
        if not continuation.startswith(self.text):
            return ""
        new = continuation[len(self.text):]
        self.text = continuation
        return new
