"""``--pretrained scratch[:size]``: a SentencePiece tokenizer learnt from the user's own text and a fresh GPT-2.

For machines that cannot download KoGPT2, and for users with enough text to train a small model themselves.
"""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

from ..corpus.tokenizer import NEWLINE_V1, SentencePieceTokenizer
from ..errors import KoGPT2Error

if TYPE_CHECKING:
    from ..model.gpt import GPT

SIZES = {  # name: (n_embd, n_layer, n_head, n_positions)
    "tiny": (64, 2, 2, 256),
    "small": (256, 4, 4, 512),
    "medium": (512, 8, 8, 1024),
    "base": (768, 12, 12, 1024),  # KoGPT2's own size
}
DEFAULT_SIZE = "tiny"


def is_scratch(source: str) -> bool:
    return source == "scratch" or source.startswith("scratch:")


def scratch_size(source: str) -> str:
    size = source.partition(":")[2] or DEFAULT_SIZE
    if size not in SIZES:
        raise KoGPT2Error(f"--pretrained {source}: unknown size '{size}'; choose one of {', '.join(SIZES)}")
    return size


def vocab_size_for(texts: list[str]) -> int:
    """Grows with the square root of the text: about 1,000 tokens for a few hundred sentences, 32,000 at most."""
    chars = sum(len(t) for t in texts)
    return int(min(32000, max(1000, round(8 * math.sqrt(chars) / 100) * 100)))


def train_tokenizer(texts: list[str], vocab_size: int | None = None) -> SentencePieceTokenizer:
    """A BPE SentencePiece model with KoGPT2 v1's special tokens: <s>=0 </s>=1 <usr>=2 <pad>=3 <sys>=4 <unk>=5,
    <unused0>=6 (line breaks)."""
    import sentencepiece as spm

    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if not lines:
        raise KoGPT2Error("no text to learn a tokenizer from")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
            vocab_size=vocab_size or vocab_size_for(texts), hard_vocab_limit=False, character_coverage=0.9995,
            bos_id=0, eos_id=1, pad_id=3, unk_id=5, user_defined_symbols=["<usr>", "<sys>", NEWLINE_V1],
            num_threads=2, minloglevel=2)
    except RuntimeError as error:
        raise KoGPT2Error(f"could not learn a tokenizer from the text: {error}") from None
    return SentencePieceTokenizer(model.getvalue())


def scratch_model(source: str, texts: list[str], vocab_size: int | None = None) -> tuple["GPT", SentencePieceTokenizer]:
    from ..model.gpt import GPT, GPTConfig

    tokenizer = train_tokenizer(texts, vocab_size)
    n_embd, n_layer, n_head, n_positions = SIZES[scratch_size(source)]
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                       n_head=n_head, activation="gelu_new", dropout=0.1)
    return GPT(config), tokenizer
