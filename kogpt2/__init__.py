"""Fine-tune SKT's KoGPT2 on your own text and generate text in its style."""
from .errors import KoGPT2Error
from .model import GPT, GPTConfig
from .pretrained import load_pretrained
from .tokenizer import Tokenizer

__all__ = ["GPT", "GPTConfig", "KoGPT2Error", "Tokenizer", "load_pretrained"]
