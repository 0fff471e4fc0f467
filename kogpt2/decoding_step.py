"""One decoding step of the model on the fastest kernels each device has: oneDNN's matmul for fp32 on the CPU, and
on CUDA a fixed-shape step captured once as a CUDA graph. Both give the logits of the plain forward."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .kv_cache import KVCache, StaticKVCache
from .model import GPT


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


class GraphStep:
    """One fixed-shape decoding step on a ``StaticKVCache``; on CUDA captured once as a CUDA graph and replayed for
    every token (one launch instead of ~150 kernel launches, which otherwise cost more host time than the GPU needs
    to run them). Where capturing fails, the same step runs eagerly."""

    def __init__(self, model: GPT, cache: StaticKVCache, batch: int, capture: bool) -> None:
        self.model, self.cache = model, cache
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=cache.buffer.device)
        self.capture, self.graph, self.logits = capture, None, None

    def _forward(self) -> torch.Tensor:
        return self.model.lm_head(self.model.hidden_states(self.token, cache=self.cache)[:, -1])

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits after ``tokens`` [batch], written at the cache's position, which then moves on by one."""
        self.token.copy_(tokens.view(-1, 1))
        if self.capture and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits.clone()
        else:
            logits = self._forward()
        self.cache.advance()
        return logits

    def _capture(self) -> None:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up (rewrites this step's own slot with the same values)
                self._forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._forward()
            self.graph = graph
        except RuntimeError:
            self.capture, self.graph = False, None
