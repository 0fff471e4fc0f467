"""The model must give transformers' GPT2LMHeadModel logits on the same weights, with and without a KV cache."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kogpt2.errors import KoGPT2Error
from kogpt2.model.gpt import GPT, GPTConfig
from kogpt2.model.hf_layout import hf_state_dict, infer_config, load_hf_state_dict

V1_SHAPED = GPTConfig(vocab_size=50000, n_positions=64, n_embd=128, n_layer=2, n_head=2, activation="gelu", dropout=0.0)
V2_SHAPED = GPTConfig(vocab_size=51200, n_positions=64, n_embd=64, n_layer=2, n_head=2, activation="gelu_new", dropout=0.0)


def reference(config: GPTConfig) -> GPT2LMHeadModel:
    hf = GPT2LMHeadModel(GPT2Config(**config.to_hf(), bos_token_id=0, eos_token_id=1, pad_token_id=3))
    return hf.eval()


@pytest.mark.parametrize("config", [V1_SHAPED, V2_SHAPED], ids=["v1", "v2"])
def test_logits_match_transformers_on_padded_batch(config):
    torch.manual_seed(0)
    hf = reference(config)
    ours = GPT(config).eval()
    load_hf_state_dict(ours, hf.state_dict())
    ids = torch.randint(10, config.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :9] = 0
    ids[mask == 0] = 3
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert got.shape == (3, 12, config.vocab_size)
    assert (got[real] - want[real]).abs().max() <= 1e-4


def test_wrong_gelu_changes_the_output():
    """Guards the activation switch: v1's exact GELU and v2's tanh GELU must not be interchangeable."""
    torch.manual_seed(0)
    exact = GPT(V1_SHAPED).eval()
    tanh = GPT(GPTConfig(**{**V1_SHAPED.to_dict(), "activation": "gelu_new"})).eval()
    tanh.load_state_dict(exact.state_dict())
    ids = torch.randint(0, 50000, (1, 8))
    with torch.no_grad():
        assert (exact(ids) - tanh(ids)).abs().max() > 1e-6


def test_kv_cache_equals_full_forward_at_every_step():
    torch.manual_seed(1)
    model = GPT(V2_SHAPED).eval()
    ids = torch.randint(0, V2_SHAPED.vocab_size, (2, 10))
    cache = model.kv_cache(batch_size=2, slots=10)
    with torch.no_grad():
        full = model(ids)
        stepped = [model(ids[:, :4], torch.arange(4), cache)]
        for t in range(4, 10):
            stepped.append(model(ids[:, t:t + 1], torch.tensor([t]), cache))
    assert torch.allclose(torch.cat(stepped, dim=1), full, atol=1e-5)


def test_kv_cache_with_left_padding_matches_unpadded_rows():
    torch.manual_seed(2)
    model = GPT(V2_SHAPED).eval()
    short, long = torch.randint(10, 1000, (1, 3)), torch.randint(10, 1000, (1, 6))
    batch = torch.cat([torch.cat([torch.full((1, 3), 3), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    nxt = torch.randint(10, 1000, (2, 1))
    cache = model.kv_cache(2, 7)
    with torch.no_grad():
        model(batch, torch.arange(6), cache, attention_mask=mask)
        step = model(nxt, torch.tensor([6]), cache, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
        alone = model(torch.cat([short, nxt[:1]], 1))[:, -1]
    assert torch.allclose(step[0, -1], alone[0], atol=1e-5)


def test_weights_round_trip_through_transformers():
    torch.manual_seed(3)
    ours = GPT(V2_SHAPED).eval()
    hf = reference(V2_SHAPED)
    hf.load_state_dict(hf_state_dict(ours), strict=True)
    back = GPT(V2_SHAPED).eval()
    load_hf_state_dict(back, hf.state_dict())
    ids = torch.randint(0, V2_SHAPED.vocab_size, (2, 7))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4
        assert torch.equal(back(ids), ours(ids))


def test_real_file_quirks_are_accepted():
    torch.manual_seed(4)
    ours = GPT(V1_SHAPED).eval()
    state = hf_state_dict(ours)
    quirky = {"module." + k[len("transformer."):] if k.startswith("transformer.") else k: v
              for k, v in state.items() if k != "lm_head.weight"}
    quirky["module.h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    quirky["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    assert infer_config(quirky, activation="gelu", dropout=0.0) == V1_SHAPED
    loaded = GPT(V1_SHAPED).eval()
    load_hf_state_dict(loaded, quirky)
    ids = torch.randint(0, 50000, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids), ours(ids))


def test_missing_unknown_and_misshapen_tensors_are_named():
    state = hf_state_dict(GPT(V1_SHAPED))
    model = GPT(V1_SHAPED)
    with pytest.raises(KoGPT2Error, match=r"missing transformer\.h\.1\.mlp\.c_fc\.bias"):
        load_hf_state_dict(model, {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.bias"})
    with pytest.raises(KoGPT2Error, match=r"unknown transformer\.h\.7\.ln_1\.weight"):
        load_hf_state_dict(model, {**state, "transformer.h.7.ln_1.weight": torch.ones(128)})
    with pytest.raises(KoGPT2Error, match=r"transformer\.wte\.weight has shape \(51200, 128\).*\(50000, 128\)"):
        load_hf_state_dict(model, {**state, "transformer.wte.weight": torch.zeros(51200, 128)})


def test_sequences_beyond_the_positions_are_refused():
    model = GPT(V2_SHAPED).eval()
    with pytest.raises(KoGPT2Error, match="64 positions"):
        model(torch.zeros(1, 65, dtype=torch.long))
