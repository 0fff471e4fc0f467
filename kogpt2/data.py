"""CSV -> texts -> token ids (cached) -> packed training blocks -> batches in a seeded, resumable order."""
from __future__ import annotations

import glob
import hashlib
import io
import math
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .errors import KoGPT2Error
from .loss import IGNORE_INDEX
from .tokenizer import Tokenizer

ENCODINGS = ("utf-8-sig", "cp949")  # UTF-8 (with or without BOM), then Korean Excel exports (CP949 covers EUC-KR)


@dataclass
class TextColumn:
    texts: list[str]
    rows_read: int
    rows_empty: int
    encoding: str
    sha256: str  # of the file's bytes, recorded in checkpoints


def read_text_column(path: str | Path, column: str = "sent", encoding: str | None = None) -> TextColumn:
    """Every non-empty cell of ``column``, exactly as written (line breaks and last characters included)."""
    path = Path(path)
    return _parse(_read_bytes(path), path, column, encoding)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KoGPT2Error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise KoGPT2Error(f"{path} is a folder; give a CSV file") from None
    except OSError as error:
        raise KoGPT2Error(f"{path}: cannot read ({error.strerror})") from None


def check_header(path: str | Path, column: str = "sent", encoding: str | None = None) -> None:
    """The cheap checks (file, encoding, column) before minutes go into loading a model."""
    path = Path(path)
    _parse(_read_bytes(path), path, column, encoding, header_only=True)


def _parse(raw: bytes, path: Path, column: str, encoding: str | None, header_only: bool = False) -> TextColumn:
    import pandas as pd

    text, used = _decode(raw, path, encoding)
    if not text.strip():
        raise KoGPT2Error(f"{path} is empty: it needs a header row with a '{column}' column and one text per row")
    if "\x00" in text:
        raise KoGPT2Error(f"{path} is not a text CSV (it contains NUL bytes)")
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False,
                            nrows=0 if header_only else None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KoGPT2Error(f"{path} is not a readable CSV: {first}") from None
    if column not in frame.columns:
        found = ", ".join(map(str, frame.columns)) or "none"
        raise KoGPT2Error(f"{path} has no column '{column}' (columns found: {found}); choose one with --column")
    if header_only:
        return TextColumn([], 0, 0, used, "")
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


@dataclass
class TokenizedRows:
    """Every row as bos + tokens + eos, back to back in one int32 array (a million rows stay compact)."""

    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64 [rows + 1]: row i is ids[offsets[i]:offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> list[int]:
        return self.ids[self.offsets[i]:self.offsets[i + 1]].tolist()

    def stream(self, keep: np.ndarray | None = None) -> np.ndarray:
        """The selected rows (a bool mask over rows; all by default) concatenated in order."""
        if keep is None:
            return self.ids
        return self.ids[np.repeat(keep, np.diff(self.offsets))]

    def lengths(self, keep: np.ndarray | None = None) -> np.ndarray:
        lengths = np.diff(self.offsets)
        return lengths if keep is None else lengths[keep]


def tokenize_rows(texts: list[str], tokenizer: Tokenizer, chunk: int = 20_000) -> TokenizedRows:
    """Batch-encode (the libraries use every core) in chunks, so no million Python lists are ever alive."""
    pieces, lengths = [], []
    for start in range(0, len(texts), chunk):
        for ids in tokenizer.encode_batch(texts[start:start + chunk]):
            pieces.append(np.array([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=np.int32))
        lengths.extend(len(p) for p in pieces[-min(chunk, len(texts) - start):])
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedRows(ids, offsets)


def load_rows(path: str | Path, column: str, encoding: str | None, tokenizer: Tokenizer,
              cache: bool = True, parsed: TextColumn | None = None) -> tuple[TokenizedRows, TextColumn]:
    """Token ids of a CSV column, cached next to the CSV under a key of the file's bytes and the tokenizer, so the
    next run on the same data skips parsing and tokenising (seconds instead of a minute for a million rows).
    ``parsed``: the column already read from this file (a scratch run reads it first to learn its tokenizer)."""
    path = Path(path)
    raw = _read_bytes(path)
    content = hashlib.sha256(raw).hexdigest()
    recipe = hashlib.sha256(b"\0".join([tokenizer.data, column.encode(), (encoding or "auto").encode()])).hexdigest()
    cached = path.with_name(f".{path.name}.{content[:16]}-{recipe[:16]}.kogpt2cache.npz")
    if cache and cached.is_file():
        try:
            with np.load(cached) as stored:
                info = TextColumn([], int(stored["rows_read"]), int(stored["rows_empty"]), str(stored["encoding"]),
                                  content)
                return TokenizedRows(stored["ids"], stored["offsets"]), info
        except Exception:  # a damaged cache is only a cache: rebuild it
            cached.unlink(missing_ok=True)
    same_file = parsed is not None and parsed.sha256 == content
    column_data = parsed if same_file else _parse(raw, path, column, encoding)
    rows = tokenize_rows(column_data.texts, tokenizer)
    if cache:
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.kogpt2cache.npz"):  # of an older version of the file
            if not stale.name.startswith(f".{path.name}.{content[:16]}-"):
                stale.unlink(missing_ok=True)
        _save_cache(cached, rows, column_data)
    return rows, column_data


def _save_cache(target: Path, rows: TokenizedRows, info: TextColumn) -> None:
    """Atomic, under a temporary name of its own (several torchrun ranks may write the same cache at once)."""
    try:
        fd, name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    except OSError:  # a read-only data folder: work without the cache
        return
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez(file, ids=rows.ids, offsets=rows.offsets, rows_read=info.rows_read, rows_empty=info.rows_empty,
                     encoding=info.encoding)
        os.replace(tmp, target)
    except OSError:  # a read-only data folder: work without the cache
        tmp.unlink(missing_ok=True)


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

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the training data in checkpoints; hashed once (a million rows are ~160 MB of ids)."""
        return hashlib.sha256(self.blocks.numpy().tobytes()).hexdigest()[:16]


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


def inputs_and_targets(blocks: torch.Tensor, real_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = blocks[:, :-1], blocks[:, 1:].clone()
    positions = torch.arange(targets.shape[1])
    targets[positions[None, :] >= real_tokens[:, None]] = IGNORE_INDEX
    return inputs, targets


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
