"""Fine-tune SKT's KoGPT2 on your own text and generate text in its style.

Attributes load lazily, so the CLIs' ``--help`` answers without importing torch.
"""
from importlib import import_module

from .errors import KoGPT2Error

_LAZY = {"GPT": ".model.gpt", "GPTConfig": ".model.config", "load_pretrained": ".store.opening",
         "open_model": ".store.opening", "TextSampler": ".generation.engine", "Tokenizer": ".corpus.tokenizer"}
__all__ = ["GPT", "GPTConfig", "KoGPT2Error", "TextSampler", "Tokenizer", "load_pretrained", "open_model"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'kogpt2' has no attribute '{name}'")
