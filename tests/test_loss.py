"""The chunked head + cross-entropy must equal the plain one, value and gradients: the CPU's form, and the form
CUDA and torch.compile run (with its vocabulary padding), which never holds every token's logits."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kogpt2.model.head_loss as loss_module
from bench.head_memory import plain_cross_entropy
from kogpt2.model.gpt import GPT, GPTConfig
from kogpt2.model.head_loss import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    linear_cross_entropy,
    padded_vocab,
)


@pytest.mark.parametrize("chunk_elements", [10_000, 8 * 2**20])  # many chunks, one
def test_equals_full_logits_cross_entropy(monkeypatch, chunk_elements):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(1000, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (37,))
    targets[[3, 20, 36]] = IGNORE_INDEX
    want = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    want_grads = torch.autograd.grad(want * 0.37, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets)
    got_grads = torch.autograd.grad(got * 0.37, (hidden, weight))
    assert torch.allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-5)


def test_evaluation_keeps_no_graph_and_gives_the_same_value():
    hidden, weight = torch.randn(5, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    targets = torch.tensor([1, 2, 3, IGNORE_INDEX, 0])
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, targets)
        want = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    assert value.grad_fn is None and torch.allclose(value, want, rtol=1e-6)


@pytest.mark.parametrize("chat", [False, True])
def test_the_models_two_loss_paths_agree(chat):
    """The CPU's head loss and the one of CUDA and any compiled step give the model one loss."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4, dropout=0.0))
    ids, targets = torch.randint(0, 300, (3, 20)), torch.randint(0, 300, (3, 20))
    targets[:, :5] = IGNORE_INDEX
    segments = torch.arange(20).div(7, rounding_mode="floor").expand(3, 20) if chat else None
    chunked = model(ids, targets=targets, segments=segments)
    model.plain_autograd = True
    plain = model(ids, targets=targets, segments=segments)
    assert torch.allclose(chunked, plain, rtol=1e-5)


@pytest.mark.parametrize("frozen_head", [False, True])
@pytest.mark.parametrize("vocab_multiple", [1, 128])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_compiled_and_cuda_form_equals_the_plain_head_and_cross_entropy(monkeypatch, precision, vocab_multiple,
                                                                            frozen_head):
    monkeypatch.setattr(loss_module, "GPU_CHUNK_TOKENS", 8)  # five chunks, the last one short
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(1000, 16, requires_grad=not frozen_head)  # frozen: a LoRA run's head
    targets = torch.randint(0, 1000, (37,))
    targets[[3, 20, 36]] = IGNORE_INDEX
    wrt = (hidden,) if frozen_head else (hidden, weight)
    results = []
    for form in (plain_cross_entropy, partial(chunked_cross_entropy, vocab_multiple=vocab_multiple)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = form(hidden, weight, targets)
        results.append((loss, torch.autograd.grad(loss * 0.37, wrt)))
    (want, want_grads), (got, got_grads) = results
    tolerance = 1e-5 if precision == "fp32" else 1e-2
    assert torch.allclose(got, want, rtol=tolerance)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.allclose(g, w, atol=tolerance * w.abs().max(), rtol=tolerance)


class LargestTensor(TorchDispatchMode):
    """The most elements any operation made (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def test_the_compiled_and_cuda_form_never_holds_every_tokens_logits(monkeypatch):
    monkeypatch.setattr(loss_module, "GPU_CHUNK_TOKENS", 8)
    tokens, vocab, width = 64, 1000, 16
    hidden, weight = torch.randn(tokens, width, requires_grad=True), torch.randn(vocab, width, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    largest = {}
    for name, form in (("plain", plain_cross_entropy), ("chunked", partial(chunked_cross_entropy, vocab_multiple=128))):
        with LargestTensor() as seen:
            form(hidden, weight, targets).backward()
        largest[name] = seen.numel
    assert largest["plain"] >= tokens * vocab
    assert largest["chunked"] <= max(8, width) * padded_vocab(vocab, 128)  # a chunk's logits, or the weight's gradient


def test_vocabulary_padding_is_invisible_outside_the_heads_loss():
    """v1's 50,000 words and scratch vocabularies are padded to whole tensor-core tiles on CUDA: the same loss and
    gradients, and the parameters, state_dict, optimizer state and logits of the real vocabulary."""
    assert [padded_vocab(n, 128) for n in (50_000, 51_200, 300, 1)] == [50_048, 51_200, 384, 128]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4, dropout=0.0)).train()
    model.plain_autograd = True
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    ids, targets = torch.randint(0, 300, (3, 20)), torch.randint(0, 300, (3, 20))
    targets[:, :5] = IGNORE_INDEX
    runs = []
    for multiple in (1, 128):
        model.vocab_multiple = multiple
        model.zero_grad(set_to_none=True)
        loss = model(ids, targets=targets)
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in model.parameters()]))
    (want, want_grads), (got, got_grads) = runs
    assert torch.allclose(got, want, rtol=1e-6)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got_grads, want_grads, strict=True))
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in model.parameters())
    assert {name: tensor.shape for name, tensor in model.state_dict().items()} == shapes
    assert model(ids).shape == (3, 20, 300)


@pytest.mark.parametrize("form", ["cpu", "chunked"])
def test_evaluation_forms_no_gradients(form):
    """Under no_grad (validation, ``kogpt2.evaluate``) the head's loss runs its one matmul per chunk, not the three
    of a training step, and gives the same loss."""
    class CountedMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountedMatmuls.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    hidden, weight = torch.randn(64, 16, requires_grad=True), torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (64,))
    loss = linear_cross_entropy if form == "cpu" else chunked_cross_entropy
    counts = []
    for grad in (True, False):
        CountedMatmuls.count = 0
        with torch.set_grad_enabled(grad), CountedMatmuls():
            value = loss(hidden, weight, targets)
        counts.append((CountedMatmuls.count, value.item()))
    (training, trained_value), (evaluating, evaluated_value) = counts
    assert evaluating == 1 and training == 3 and evaluated_value == trained_value
