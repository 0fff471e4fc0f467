"""One decoding step of the model on the fastest kernels each device has: oneDNN's matmul for fp32 on the CPU, and
on CUDA a fixed-shape step captured once (per visible length) as a CUDA graph. Both give the logits of the plain
forward."""
from __future__ import annotations

import weakref
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..model.gpt import GPT
from ..model.kv_cache import KVCache


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


def last_logits(model: GPT, tokens: torch.Tensor, input_pos: torch.Tensor, cache: KVCache,
                last: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [batch, vocab] after ``tokens`` [batch, time] written at cache slots ``input_pos``: only the last
    position's, so a long prompt costs no [prompt, vocab] logits; or at each row's ``last`` positions ([batch]:
    prompts padded to one width; [batch, k]: [batch, k, vocab], a prompt to score)."""
    hidden = model.hidden_states(tokens, input_pos, cache)  # [batch, time, n_embd]
    rows = hidden[:, -1] if last is None else hidden[torch.arange(len(last), device=last.device), last]
    return model.lm_head(rows)


class DecodingStep:
    """``last_logits`` on the CPU kernels that are fastest for decoding (measured on the project machines,
    bench/README.md):

    - fp32: every linear layer and the head on oneDNN's matmul: whole steps 1.45x faster than through ATen's MKL
      calls for one sample, 1.6x for eight (AMD EPYC);
    - bf16/fp16: ATen's own kernels for one sample (through oneDNN a step is 1.6x slower), oneDNN for batches.
    """

    def __init__(self, model: GPT, batch: int) -> None:
        weight = model.lm_head.weight
        cpu = weight.device.type == "cpu"
        self.model = model
        self.fp32_onednn = cpu and weight.dtype == torch.float32 and ONEDNN_LINEAR is not None
        self.aten_only = cpu and batch == 1 and weight.dtype != torch.float32

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache: KVCache,
                 last: torch.Tensor | None = None) -> torch.Tensor:
        with self._kernels():
            return last_logits(self.model, tokens, input_pos, cache, last)

    def _kernels(self):
        if self.fp32_onednn:
            return _LinearOnOneDNN()
        if self.aten_only:
            return torch.backends.mkldnn.flags(enabled=False, deterministic=None, allow_tf32=None, fp32_precision=None)
        return nullcontext()


def visible_lengths(n_positions: int) -> list[int]:
    """The slots a fixed-shape step may attend over: the whole window and its half, quarter and eighth (128, 256,
    512 and 1,024 for GPT-2's window), so a short text's step reads an eighth of the cache, not all of it."""
    return sorted({max(1, n_positions >> halvings) for halvings in range(4)})


def visible_length(furthest: int, lengths: list[int]) -> int:
    """The smallest of ``lengths`` (ascending) that holds slot ``furthest``."""
    return next(length for length in lengths if furthest < length)


class GraphStep:
    """One fixed-shape decoding step over a cache of the model's whole window, each row at its own position, with
    the tokens and positions in fixed buffers; on CUDA captured once as a CUDA graph and replayed for every token
    (one launch instead of ~150 kernel launches, which otherwise cost more host time than the GPU needs to run
    them). A step attends over the fewest slots that hold every row's position (``visible_lengths``: one graph
    each, all over views of the one cache). Where capturing fails, the same step runs eagerly. ``graph_step`` keeps
    one per model, batch size, dtype and device, so a capture (which synchronises and empties the allocator's
    cache) happens once per visible length, not on every prompt; a server's batch keeps its own over its own
    cache."""

    def __init__(self, model: GPT, cache: KVCache) -> None:
        self.model = weakref.ref(model)  # kept per model in a weak map: the step must not keep its model alive
        self.cache = cache
        batch, device = cache.rows, cache.buffer.device
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.input_pos = torch.zeros(batch, 1, dtype=torch.long, device=device)  # each row's slot
        self.views = {length: cache.view(batch, length) for length in visible_lengths(cache.capacity)}
        self.capture = self.pinned = device.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # each graph's output
        self.captures = 0

    def _forward(self, visible: int) -> torch.Tensor:
        return last_logits(self.model(), self.token, self.input_pos, self.views[visible])

    def __call__(self, tokens: torch.Tensor, positions: int | list[int]) -> torch.Tensor:
        """Logits [batch, vocab] after ``tokens`` [batch], written at slot ``positions`` (one for all rows, or one
        per row; known on the host, so choosing the visible length waits for nothing on the device)."""
        self.token.copy_(tokens.view(-1, 1))
        if isinstance(positions, int):
            self.input_pos.fill_(positions)
            furthest = positions
        else:  # through pinned memory: the copy is queued, not waited for
            self.input_pos.copy_(torch.tensor(positions, pin_memory=self.pinned).view(-1, 1), non_blocking=True)
            furthest = max(positions)
        visible = visible_length(furthest, list(self.views))
        if self.capture and visible not in self.graphs:
            self._capture(visible)
        if visible in self.graphs:
            self.graphs[visible].replay()
            return self.logits[visible].clone()
        return self._forward(visible)

    def _capture(self, visible: int) -> None:
        self.captures += 1
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up (rewrites this step's own slot with the same values)
                self._forward(visible)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a capture must not trip other threads' CUDA calls (a server's, or NCCL's under torchrun)
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.logits[visible] = self._forward(visible)
            self.graphs[visible] = graph
        except RuntimeError:
            self.capture = False


_GRAPH_STEPS: "weakref.WeakKeyDictionary[GPT, dict[tuple, GraphStep]]" = weakref.WeakKeyDictionary()


def graph_step(model: GPT, batch: int) -> GraphStep:
    """The model's one ``GraphStep`` for this batch size, dtype and device (made on first use, then reused)."""
    weight = model.lm_head.weight
    steps = _GRAPH_STEPS.setdefault(model, {})
    key = (batch, weight.dtype, weight.device)
    if key not in steps:
        steps[key] = GraphStep(model, model.kv_cache(batch, model.config.n_positions))
    return steps[key]
