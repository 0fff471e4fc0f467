"""The two KoGPT2 tokenizers behind one small interface.

v1 is a SentencePiece model; v2 a Hugging Face ``tokenizer.json``. Both are stored in checkpoints as their file's
bytes plus a kind, so a checkpoint can generate with nothing else at hand.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from ..errors import KoGPT2Error

NEWLINE_V1 = "<unused0>"  # the originals encode a line break as <unused0>, since v1's normalizer drops "\n"


class Tokenizer(Protocol):
    kind: str
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    vocab_size: int
    data: bytes  # the tokenizer file itself, stored in checkpoints

    def encode(self, text: str) -> list[int]: ...
    def token_id(self, piece: str) -> int | None: ...
    def id_to_piece(self, i: int) -> str: ...
    def decode(self, ids: list[int]) -> str: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


class SentencePieceTokenizer:
    """KoGPT2 v1: ids are sentencepiece's own (exactly the original gluonnlp vocabulary's), encoded without sampling."""

    kind = "sentencepiece"

    def __init__(self, data: bytes) -> None:
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as error:
            raise KoGPT2Error(f"not a SentencePiece model ({error})") from None
        self.data = data
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._id("<s>")
        self.eos_id = self._id("</s>")
        self.pad_id = self._id("<pad>")
        self.unk_id = self._sp.unk_id()
        self.newline_id = self._sp.piece_to_id(NEWLINE_V1)
        if self.newline_id == self.unk_id:
            self.newline_id = None
        self._pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        self._hidden = {self.bos_id, self.eos_id, self.pad_id}

    def _id(self, piece: str) -> int:
        i = self._sp.piece_to_id(piece)
        if i == self._sp.unk_id():
            raise KoGPT2Error(f"the SentencePiece model has no {piece} token")
        return i

    def id_to_piece(self, i: int) -> str:
        return self._pieces[i]

    def token_id(self, piece: str) -> int | None:
        """The id of a piece the vocabulary has whole (such as ``<usr>``), else None."""
        i = self._sp.piece_to_id(piece)
        return None if i == self.unk_id and piece != "<unk>" else i

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        lines = [t.split("\n") for t in texts]
        flat = self._sp.encode([line for group in lines for line in group], num_threads=-1)
        out, at = [], 0
        for group in lines:
            ids: list[int] = []
            for n, line_ids in enumerate(flat[at:at + len(group)]):
                if n and self.newline_id is not None:
                    ids.append(self.newline_id)
                ids.extend(line_ids)
            out.append(ids)
            at += len(group)
        return out

    def decode(self, ids: list[int]) -> str:
        """Like sentencepiece's decode, but a line break comes back as "\\n" and an unknown character as a visible
        ``<unk>`` (sentencepiece would print " ⁇ ")."""
        pieces = []
        for i in ids:
            if i in self._hidden:
                continue
            if i == self.newline_id:
                pieces.append("\n")
            elif i == self.unk_id:
                pieces.append("<unk>")
            else:
                pieces.append(self._pieces[i])
        lines = "".join(pieces).replace("▁", " ").split("\n")
        return "\n".join(line[1:] if line.startswith(" ") else line for line in lines)


class HFTokenizer:
    """KoGPT2 v2: ``tokenizer.json`` (BPE). Published convention: bos = eos = ``</s>``, pad ``<pad>``, unk ``<unk>``."""

    kind = "tokenizers"

    def __init__(self, data: bytes) -> None:
        from tokenizers import Tokenizer as HFTokenizerFile

        try:
            self._tok = HFTokenizerFile.from_str(data.decode("utf-8"))
        except Exception as error:
            raise KoGPT2Error(f"not a tokenizer.json ({error})") from None
        self.data = data
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._id("</s>")
        self.bos_id = self.eos_id  # SKT's README: bos_token='</s>'
        self.pad_id = self._id("<pad>")
        self.unk_id = self._id("<unk>")
        self._hidden = {self._id("<s>"), self.eos_id, self.pad_id}

    def _id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KoGPT2Error(f"the tokenizer has no {token} token")
        return i

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(i)

    def token_id(self, piece: str) -> int | None:
        """The id of a token the vocabulary has whole (such as ``<usr>``), else None."""
        return self._tok.token_to_id(piece)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        # v2 marks its emoji and emoticons "special": the library's default decode would delete them.
        return self._tok.decode([i for i in ids if i not in self._hidden], skip_special_tokens=False)


SPECIAL_PIECES = ("<s>", "</s>", "<pad>", "<unk>", "<usr>", "<sys>")


def encode_with_special_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """``text`` encoded with the special tokens it names (``<s>``, ``</s>``...) read as their ids, as transformers'
    tokenizers read them: what an API client that writes special tokens into a prompt (lm-eval) means."""
    specials = {piece: tokenizer.token_id(piece) for piece in SPECIAL_PIECES}
    specials = {piece: i for piece, i in specials.items() if i is not None}
    ids: list[int] = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text) if specials else [text]:
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(tokenizer.encode(part))
    return ids


KINDS = {SentencePieceTokenizer.kind: SentencePieceTokenizer, HFTokenizer.kind: HFTokenizer}


def tokenizer_from_bytes(kind: str, data: bytes) -> Tokenizer:
    if kind not in KINDS:
        raise KoGPT2Error(f"unknown tokenizer kind '{kind}'; expected one of {sorted(KINDS)}")
    return KINDS[kind](data)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``*.spiece`` / ``*.model`` SentencePiece file or a ``tokenizer.json``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise KoGPT2Error(f"cannot read tokenizer file {path}: {error.strerror}") from None
    kind = HFTokenizer.kind if path.suffix == ".json" else SentencePieceTokenizer.kind
    try:
        return tokenizer_from_bytes(kind, data)
    except KoGPT2Error as error:
        raise KoGPT2Error(f"{path}: {error}") from None

