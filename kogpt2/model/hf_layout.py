"""The Hugging Face ``GPT2LMHeadModel`` layout (Conv1D weights stored [in, out]) to and from our ``GPT``."""
from __future__ import annotations

import re

import torch

from ..errors import KoGPT2Error
from .gpt import GPT, GPTConfig

_CONV1D = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_BUFFERS = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights with GPT2LMHeadModel's names and Conv1D's [in, out] orientation."""
    out = {}
    for name, tensor in model.state_dict().items():
        out[name] = tensor.t().contiguous() if _CONV1D.match(name) else tensor
    return out


def normalize_hf_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept what real files contain: ``module.`` (DataParallel) or no ``transformer.`` prefix, the causal-mask
    buffers old checkpoints carry, and a missing (tied) ``lm_head.weight``."""
    out = {}
    for key, tensor in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        if _BUFFERS.match(key):
            continue
        out[key] = tensor
    if "lm_head.weight" not in out and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def infer_config(state: dict[str, torch.Tensor], **overrides) -> GPTConfig:
    """Shapes of a GPT-2 state dict give every size but the head count, which is n_embd / 64 in every GPT-2."""
    state = normalize_hf_keys(state)
    vocab_size, n_embd = state["transformer.wte.weight"].shape
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")}
    values = dict(vocab_size=vocab_size, n_embd=n_embd, n_positions=state["transformer.wpe.weight"].shape[0],
                  n_layer=len(layers), n_head=max(1, n_embd // 64))
    values.update(overrides)
    return GPTConfig(**values)


def load_hf_state_dict(model: GPT, state: dict[str, torch.Tensor]) -> None:
    """Load weights in the GPT2LMHeadModel layout; every missing, unknown or misshapen tensor is named."""
    state = normalize_hf_keys(state)
    expected = hf_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if unknown:
            parts.append(f"unknown {', '.join(unknown[:5])}" + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
        raise KoGPT2Error(f"weights do not fit a GPT-2 of this config: {'; '.join(parts)}")
    for key, want in expected.items():
        if state[key].shape != want.shape:
            raise KoGPT2Error(
                f"weights do not fit the config: {key} has shape {tuple(state[key].shape)}, "
                f"the config needs {tuple(want.shape)}")
    ours = {k: (v.t() if _CONV1D.match(k) else v) for k, v in state.items()}
    with torch.no_grad():
        model.load_state_dict(ours, strict=True)
