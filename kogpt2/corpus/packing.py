"""Token ids -> training blocks: text rows packed back to back, or whole chat examples with their own attention; and
the seeded, resumable order of the blocks and the validation split."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property, partial

import numpy as np
import torch

from ..errors import KoGPT2Error
from ..model.head_loss import IGNORE_INDEX
from .chat_format import ChatExample, ChatFormat, read_pairs
from .reading import CsvColumn, CsvFile, TokenizedRows
from .tokenizer import Tokenizer


@dataclass
class PackedData:
    """Rows concatenated and cut into blocks of ``block_size + 1`` tokens (inputs and shifted targets).

    Packing wastes no compute on padding; only the last block is padded, and its padding is left out of the loss.
    A row longer than a block simply continues in the next one.
    """

    blocks: torch.Tensor  # [n_blocks, block_size + 1] int64 token ids
    real_tokens: torch.Tensor  # [n_blocks] how many targets of each block count
    rows: int
    rows_split: int  # rows longer than a block, spread over several (chat: cut to fit)
    tokens: int
    targets: torch.Tensor | None = None  # chat: [n_blocks, block_size], the question's targets masked
    segments: torch.Tensor | None = None  # chat: [n_blocks, block_size], which example each position belongs to

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the training data in checkpoints; hashed once (a million rows are ~160 MB of ids)."""
        digest = hashlib.sha256(self.blocks.numpy().tobytes())
        if self.targets is not None:
            digest.update(self.targets.numpy().tobytes())
        return digest.hexdigest()[:16]

    def batch(self, idx: torch.Tensor) -> Batch:
        """Inputs and targets of the blocks ``idx`` (targets past a block's real tokens are ignored)."""
        inputs = self.blocks[idx, :-1]
        if self.targets is not None:
            return Batch(inputs, self.targets[idx], self.segments[idx])
        targets = self.blocks[idx, 1:].clone()
        targets[torch.arange(targets.shape[1])[None, :] >= self.real_tokens[idx][:, None]] = IGNORE_INDEX
        return Batch(inputs, targets, None)


@dataclass
class Batch:
    inputs: torch.Tensor  # [batch, time]
    targets: torch.Tensor  # [batch, time], IGNORE_INDEX where nothing counts
    segments: torch.Tensor | None  # [batch, time] or None (one text stream: plain causal attention)


def pack(rows: TokenizedRows, block_size: int, pad_id: int, keep: np.ndarray | None = None) -> PackedData:
    stream = torch.from_numpy(rows.stream(keep).astype(np.int64))
    lengths = rows.lengths(keep)
    n_blocks = max(1, math.ceil((len(stream) - 1) / block_size))
    padded = torch.full((n_blocks * block_size + 1,), pad_id, dtype=torch.long)
    padded[:len(stream)] = stream
    starts = torch.arange(n_blocks) * block_size
    blocks = padded[starts[:, None] + torch.arange(block_size + 1)]
    real = (len(stream) - 1 - starts).clamp(max=block_size, min=0)
    return PackedData(blocks, real, len(lengths), int((lengths > block_size).sum()), len(stream))


def pack_examples(examples: list[ChatExample], block_size: int, pad_id: int,
                  keep: np.ndarray | None = None) -> PackedData:
    """Whole examples packed into blocks of ``block_size`` inputs: an example never spans two blocks, a block holds as
    many as fit, and each keeps its own segment number so attention and positions stay inside it. Only the
    example's own targets count (chat: answers and their end tokens). An example longer than a block is cut to fit
    (counted in ``rows_split``); ``rows`` counts turns, one per question/answer row."""
    chosen = [e for e, k in zip(examples, keep if keep is not None else [True] * len(examples)) if k]
    inputs, targets, segments = [], [], []
    row_in, row_out, row_seg = [], [], []
    cut = 0

    def close() -> None:
        fill = block_size - len(row_in)
        inputs.append(row_in + [pad_id] * fill)
        targets.append(row_out + [IGNORE_INDEX] * fill)
        row_seg.extend([len(set(row_seg)) if row_seg else 0] * fill)
        segments.append(list(row_seg))

    for ids, wanted, _ in chosen:
        if len(ids) - 1 > block_size:
            ids, wanted, cut = ids[:block_size + 1], wanted[:block_size], cut + 1
        if row_in and len(row_in) + len(ids) - 1 > block_size:
            close()
            row_in, row_out, row_seg = [], [], []
        segment = row_seg[-1] + 1 if row_seg else 0
        row_in += ids[:-1]
        row_out += wanted
        row_seg += [segment] * (len(ids) - 1)
    if row_in or not inputs:
        close()
    inputs_t = torch.tensor(inputs, dtype=torch.long)
    targets_t = torch.tensor(targets, dtype=torch.long)
    blocks = torch.cat([inputs_t, torch.full((len(inputs), 1), pad_id, dtype=torch.long)], dim=1)
    return PackedData(blocks, (targets_t != IGNORE_INDEX).sum(1), sum(e.turns for e in chosen), cut,
                      sum(len(e.ids) for e in chosen), targets_t, torch.tensor(segments, dtype=torch.long))


def epoch_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    """The same shuffled order for the same seed and epoch, so a resumed run sees exactly the same batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_blocks, generator=generator)


def validation_mask(n_rows: int, val_ratio: float, seed: int) -> np.ndarray:
    """A seeded random share of rows for validation (none for tiny data sets)."""
    mask = np.zeros(n_rows, dtype=bool)
    if val_ratio <= 0 or n_rows < 10:
        return mask
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_rows, generator=generator).numpy()
    mask[order[:max(1, round(n_rows * val_ratio))]] = True
    return mask


class TextCorpus:
    """The training text of a data file's text column: rows packed back to back."""

    turns = 1  # chat examples only have more

    def __init__(self, csv: CsvFile, column: str, cache: bool, seed: int) -> None:
        """``seed`` chooses the validation rows, as ``validation_mask`` does everywhere."""
        self.text, self.cache, self.seed = CsvColumn(csv, column), cache, seed
        self.column = self.text.column

    @property
    def rows_read(self) -> int:  # asked after packing: a warm token cache knows it without parsing the file
        return self.text.rows_read

    @property
    def rows_empty(self) -> int:
        return self.text.rows_empty

    def texts(self, val_ratio: float) -> list[str]:
        """What a scratch tokenizer learns from: the rows training will use (``val_ratio`` 0: all)."""
        keep = ~validation_mask(len(self.text.texts), val_ratio, self.seed)
        return [t for t, k in zip(self.text.texts, keep) if k]

    def pack(self, tokenizer: Tokenizer, max_len: int, val_ratio: float) -> tuple[PackedData, PackedData | None]:
        """Training blocks and, with a ``val_ratio``, validation blocks from the held-out rows."""
        rows = self.text.token_rows(tokenizer, self.cache)
        val = validation_mask(len(rows), val_ratio, self.seed)
        packed = partial(pack, rows, max_len, tokenizer.pad_id)
        return packed(~val), packed(val) if val.any() else None


class ChatCorpus:
    """The question/answer rows of a data file (grouped into dialogues by ``dialogue_column``, when given): whole
    examples, each attending only to itself."""

    def __init__(self, csv: CsvFile, question_column: str, answer_column: str, dialogue_column: str | None,
                 seed: int) -> None:
        """``seed`` chooses the validation dialogues, as ``validation_mask`` does everywhere."""
        self.pairs, self.seed = read_pairs(csv, question_column, answer_column, dialogue_column), seed
        self.column = answer_column
        self.rows_read, self.rows_empty = self.pairs.rows_read, self.pairs.rows_empty
        self.turns = 1  # the most turns in one training example, known once packed

    def texts(self, val_ratio: float) -> list[str]:
        """What a scratch tokenizer learns from: the questions and answers training will use."""
        keep = ~validation_mask(len(self.pairs.dialogues), val_ratio, self.seed)
        turns = [turn for dialogue, k in zip(self.pairs.dialogues, keep) if k for turn in dialogue]
        return [q for q, _ in turns] + [a for _, a in turns]

    def pack(self, tokenizer: Tokenizer, max_len: int, val_ratio: float) -> tuple[PackedData, PackedData | None]:
        """Training blocks and, with a ``val_ratio``, validation blocks from the held-out dialogues."""
        chat = ChatFormat(tokenizer)
        dialogues = [chat.dialogue(turns, max_len) for turns in self.pairs.dialogues]
        held_out = validation_mask(len(dialogues), val_ratio, self.seed)
        val = np.repeat(held_out, [len(d) for d in dialogues])
        examples = [example for d in dialogues for example in d]
        self.turns = max(example.turns for example in examples)
        packed = partial(pack_examples, examples, max_len, tokenizer.pad_id)
        return packed(~val), packed(val) if val.any() else None


def open_corpus(csv: CsvFile, chat: bool, column: str, question_column: str, answer_column: str,
                dialogue_column: str | None, cache: bool, seed: int) -> TextCorpus | ChatCorpus:
    """A run's training text: its question/answer rows for ``--chat``, else its text column."""
    if dialogue_column and not chat:
        raise KoGPT2Error("--dialogue_column groups question/answer rows into dialogues: it needs --chat")
    if chat:
        return ChatCorpus(csv, question_column, answer_column, dialogue_column, seed)
    return TextCorpus(csv, column, cache, seed)
