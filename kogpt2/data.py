"""CSV -> texts -> token ids -> packed training blocks -> batches in a seeded, resumable order."""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import KoGPT2Error
from .tokenizer import Tokenizer

ENCODINGS = ("utf-8-sig", "cp949")  # UTF-8 (with or without BOM), then Korean Excel exports (CP949 covers EUC-KR)
IGNORE_INDEX = -100


@dataclass
class TextColumn:
    texts: list[str]
    rows_read: int
    rows_empty: int
    encoding: str
    sha256: str  # of the file's bytes, recorded in checkpoints


def read_text_column(path: str | Path, column: str = "sent", encoding: str | None = None) -> TextColumn:
    """Every non-empty cell of ``column``, exactly as written (line breaks and last characters included)."""
    import pandas as pd

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KoGPT2Error(f"{path}: no such file") from None
    except OSError as error:
        raise KoGPT2Error(f"{path}: cannot read ({error.strerror})") from None
    text, used = _decode(raw, path, encoding)
    if not text.strip():
        raise KoGPT2Error(f"{path} is empty: it needs a header row with a '{column}' column and one text per row")
    if "\x00" in text:
        raise KoGPT2Error(f"{path} is not a text CSV (it contains NUL bytes)")
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KoGPT2Error(f"{path} is not a readable CSV: {first}") from None
    if column not in frame.columns:
        found = ", ".join(map(str, frame.columns)) or "none"
        raise KoGPT2Error(f"{path} has no column '{column}' (columns found: {found}); choose one with --column")
    cells = frame[column].tolist()
    texts = [cell for cell in cells if cell.strip()]
    if not texts:
        raise KoGPT2Error(f"{path}: column '{column}' has no text in any of its {len(cells)} rows")
    return TextColumn(texts, len(cells), len(cells) - len(texts), used, hashlib.sha256(raw).hexdigest())


def _decode(raw: bytes, path: Path, encoding: str | None) -> tuple[str, str]:
    if encoding:
        try:
            return raw.decode(encoding), encoding
        except LookupError:
            raise KoGPT2Error(f"unknown encoding '{encoding}' (try utf-8 or cp949)") from None
        except UnicodeDecodeError as error:
            raise KoGPT2Error(f"{path} is not valid {encoding} (byte {error.start}); try --encoding utf-8 or cp949") from None
    for candidate in ENCODINGS:
        try:
            return raw.decode(candidate), "utf-8" if candidate == "utf-8-sig" else candidate
        except UnicodeDecodeError:
            continue
    raise KoGPT2Error(f"{path} is neither UTF-8 nor CP949/EUC-KR text; save it as UTF-8 or pass --encoding")


def encode_rows(texts: list[str], tokenizer: Tokenizer) -> list[list[int]]:
    """Each row becomes bos + tokens + eos, as in the original."""
    return [[tokenizer.bos_id] + ids + [tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]


@dataclass
class PackedData:
    """Rows concatenated and cut into blocks of ``block_size + 1`` tokens (inputs and shifted targets).

    Packing wastes no compute on padding; only the last block is padded, and its padding is left out of the loss.
    A row longer than a block simply continues in the next one.
    """

    blocks: torch.Tensor  # [n_blocks, block_size + 1] int64 token ids
    real_tokens: torch.Tensor  # [n_blocks] how many targets of each block are real
    rows: int
    rows_split: int  # rows longer than a block, spread over several
    tokens: int

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.blocks.numpy().tobytes()).hexdigest()[:16]


def pack_rows(rows: list[list[int]], block_size: int, pad_id: int) -> PackedData:
    stream = torch.tensor([t for row in rows for t in row], dtype=torch.long)
    n_blocks = max(1, math.ceil((len(stream) - 1) / block_size))
    padded = torch.full((n_blocks * block_size + 1,), pad_id, dtype=torch.long)
    padded[:len(stream)] = stream
    starts = torch.arange(n_blocks) * block_size
    blocks = padded[starts[:, None] + torch.arange(block_size + 1)]
    real = (len(stream) - 1 - starts).clamp(max=block_size, min=0)
    return PackedData(blocks, real, len(rows), sum(len(r) > block_size for r in rows), len(stream))


def inputs_and_targets(blocks: torch.Tensor, real_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = blocks[:, :-1], blocks[:, 1:].clone()
    positions = torch.arange(targets.shape[1])
    targets[positions[None, :] >= real_tokens[:, None]] = IGNORE_INDEX
    return inputs, targets


def epoch_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    """The same shuffled order for the same seed and epoch, so a resumed run sees exactly the same batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_blocks, generator=generator)


def split_rows(texts: list[str], val_ratio: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded random share of rows for validation (none for tiny data sets)."""
    if val_ratio <= 0 or len(texts) < 10:
        return texts, []
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=generator).tolist()
    n_val = max(1, round(len(texts) * val_ratio))
    val = set(order[:n_val])
    return [t for i, t in enumerate(texts) if i not in val], [t for i, t in enumerate(texts) if i in val]
