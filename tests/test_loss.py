"""The chunked head + cross-entropy must equal the plain one, value and gradients."""
import pytest
import torch
import torch.nn.functional as F

import kogpt2.model.head_loss as loss_module
from kogpt2.model.head_loss import IGNORE_INDEX, linear_cross_entropy


@pytest.mark.parametrize("chunk_elements", [10_000, 8 * 2**20, None])  # many chunks, one, the GPU's plain path
def test_equals_full_logits_cross_entropy(monkeypatch, chunk_elements):
    if chunk_elements is None:
        monkeypatch.setattr(loss_module, "_LinearCrossEntropy", None)  # must not be used
        linear_cross_entropy = loss_module.plain_cross_entropy
    else:
        monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", chunk_elements)
        linear_cross_entropy = loss_module.linear_cross_entropy
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


def test_no_gradients_kept_when_none_are_needed():
    hidden, weight = torch.randn(5, 4), torch.randn(9, 4)
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, IGNORE_INDEX, 0]))
    assert torch.isfinite(value)
