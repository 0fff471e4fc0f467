"""The chunked head + cross-entropy must equal the plain one, value and gradients."""
import pytest
import torch
import torch.nn.functional as F

import kogpt2.model.head_loss as loss_module
from kogpt2.model.head_loss import IGNORE_INDEX, linear_cross_entropy


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
    """The CPU's chunked head loss and the plain one (CUDA's, and any compiled step's) give the model one loss."""
    from kogpt2.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4, dropout=0.0))
    ids, targets = torch.randint(0, 300, (3, 20)), torch.randint(0, 300, (3, 20))
    targets[:, :5] = IGNORE_INDEX
    segments = torch.arange(20).div(7, rounding_mode="floor").expand(3, 20) if chat else None
    chunked = model(ids, targets=targets, segments=segments)
    model.plain_autograd = True
    plain = model(ids, targets=targets, segments=segments)
    assert torch.allclose(chunked, plain, rtol=1e-5)
