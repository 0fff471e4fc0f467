"""The tied embedding/head weight's gradient, written in place (one process) or returned in a kept buffer (DDP),
equals plain autograd's, with gradient accumulation too, and never overwrites an accumulated gradient."""
import pytest
import torch

from kogpt2.model.gpt import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4, dropout=0.0)


def gradients(mode: str, micro_batches: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(CONFIG).train()
    model.tied_grad.in_place = mode == "in place"
    model.plain_autograd = mode == "plain autograd"  # the plain embedding and the whole logits' cross-entropy
    for k in range(micro_batches):
        generator = torch.Generator().manual_seed(k)
        ids, targets = torch.randint(0, 300, (3, 20), generator=generator), torch.randint(0, 300, (3, 20), generator=generator)
        (model(ids, targets=targets) * 0.37).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize("mode", ["in place", "kept buffer"])
def test_equals_plain_autograd(mode, micro_batches):
    want = gradients("plain autograd", micro_batches)
    got = gradients(mode, micro_batches)
    assert all(torch.allclose(g, w, atol=1e-5, rtol=1e-5) for g, w in zip(got, want))


def test_the_kept_buffer_is_reused_and_the_weight_gradient_cleared_by_the_optimizer_is_rebuilt():
    torch.manual_seed(0)
    model = GPT(CONFIG).train()
    model.tied_grad.in_place = True
    ids = torch.randint(0, 300, (2, 10))
    model(ids, targets=ids).backward()
    first = model.transformer.wte.weight.grad.clone()
    buffer = model.transformer.wte.weight.grad.data_ptr()
    model.zero_grad(set_to_none=True)
    model(ids, targets=ids).backward()
    assert model.transformer.wte.weight.grad.data_ptr() == buffer  # no fresh 157 MB tensor each step
    assert torch.equal(model.transformer.wte.weight.grad, first)  # and the old values were zeroed first
