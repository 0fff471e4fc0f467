"""The GPT-2 shape and its translation to and from a Hugging Face ``config.json`` (its own module, as in
transformers: the cache, the checkpoint and the exporter need the numbers without the network)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import KoGPT2Error

ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass
class GPTConfig:
    vocab_size: int = 51200
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"  # KoGPT2 v1 was trained with the exact erf GELU ("gelu"), v2 with "gelu_new"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise KoGPT2Error(f"unknown activation '{self.activation}'; expected one of {sorted(ACTIVATIONS)}")
        if self.n_embd % self.n_head:
            raise KoGPT2Error(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def from_hf(cls, hf: dict) -> "GPTConfig":
        """Read a Hugging Face GPT-2 ``config.json``."""
        return cls(
            vocab_size=hf["vocab_size"],
            n_positions=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_embd=hf["n_embd"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            activation=hf.get("activation_function", "gelu_new"),
            dropout=hf.get("resid_pdrop", 0.1),
        )

    def to_hf(self) -> dict:
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": self.activation,
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "tie_word_embeddings": True,
        }
