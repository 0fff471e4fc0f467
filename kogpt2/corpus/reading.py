"""A data file (CSV, TSV, plain text, JSON Lines) -> texts -> token ids, cached next to the file (``packing.py`` turns
the ids into training blocks)."""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..defaults import ANSWER_COLUMN, DATA_FORMAT, JSONL_TEXT_KEY, QUESTION_COLUMN, TEXT_COLUMN, TXT_UNIT
from ..errors import KoGPT2Error
from .formats import NEEDS, csv_table, decode, detect_format, jsonl_table, read_bytes, text_units
from .tokenizer import Tokenizer


class CsvFile:
    """A data file read, checksummed, decoded and its header checked once, when opened (before minutes go into loading
    a model); its cells parsed only when asked for. Every format is a table of text columns: a CSV or TSV its columns,
    a .jsonl its keys, a .txt one column (``TEXT_COLUMN``) of lines or paragraphs."""

    def __init__(self, path: str | Path, encoding: str | None = None, data_format: str = DATA_FORMAT,
                 txt_unit: str = TXT_UNIT) -> None:
        self.path = Path(path)
        raw = read_bytes(self.path)
        self.sha256 = hashlib.sha256(raw).hexdigest()  # recorded in checkpoints
        self.text, self.encoding = decode(raw, self.path, encoding)
        self.requested_encoding = encoding
        self.format = detect_format(self.path, self.text, data_format)
        self.read_as_table = data_format == "auto" and self.path.suffix.lower() == ".txt" and self.format == "tsv"
        if not self.text.strip():
            raise KoGPT2Error(f"{self.path} is empty: it needs {NEEDS[self.format]}")
        self.txt_unit = ""
        if self.format == "txt":
            self._units, self.txt_unit = text_units(self.text, txt_unit)
        self.columns = list(self._read(nrows=0))

    @property
    def layout(self) -> str:
        """How it was read (the run's data line, the token cache's key): the encoding, then the format if not CSV."""
        shape = {"csv": "", "tsv": ", tab-separated", "jsonl": ", JSON Lines",
                 "txt": f", one text per {self.txt_unit}"}[self.format]
        return self.encoding + shape

    def _read(self, nrows: int | None = None) -> dict[str, list[str | None]]:
        """Each column's cells (``nrows=0``: the columns alone)."""
        if self.format == "txt":
            return {TEXT_COLUMN: self._units[:nrows]}
        if self.format == "jsonl":
            return jsonl_table(self.text, self.path, nrows)
        return csv_table(self.text, self.path, self.format, nrows)

    def require(self, column: str, flag: str = "--column", alternatives: tuple[str, ...] = ()) -> str:
        """``column``, else the first of ``alternatives`` the file has (a .jsonl: else the key ``JSONL_TEXT_KEY`` for
        the default text column; a .txt: its one column); a missing one is named with what to do."""
        if self.format == "txt":
            if flag == "--column":
                return TEXT_COLUMN
            raise KoGPT2Error(f"{self.path} is plain text (one text per {self.txt_unit}), not questions and answers; a "
                              'chatbot learns from a CSV with Q,A columns or a .jsonl of {"Q": ..., "A": ...} lines')
        jsonl_text = self.format == "jsonl" and column == TEXT_COLUMN and flag == "--column"
        for name in (column, *alternatives, *((JSONL_TEXT_KEY,) if jsonl_text else ())):
            if name in self.columns:
                return name
        found = ", ".join(self.columns) or "none"
        hint = f"choose one with {flag}"
        if {QUESTION_COLUMN, ANSWER_COLUMN} <= set(self.columns) and flag == "--column":
            hint = f"this looks like a question/answer {'file' if self.format == 'jsonl' else 'CSV'}: train a " \
                   "chatbot with --chat"
        elif self.read_as_table:
            hint += ", or read one text per line with --format txt (its first line has tabs, so it was read as a table)"
        elif len(self.columns) == 1 and self.format != "jsonl":
            hint += ", or if it holds one text per line with no header, read it with --format txt"
        if self.format == "jsonl":
            asked = f"'{column}'" + (f" or '{JSONL_TEXT_KEY}'" if jsonl_text else "")
            raise KoGPT2Error(f"{self.path} has no key {asked} on its first line (keys found: {found}); {hint}")
        raise KoGPT2Error(f"{self.path} has no column '{column}' (columns found: {found}); {hint}")

    @cached_property
    def table(self) -> dict[str, list[str | None]]:
        return self._read()

    def cells(self, column: str) -> list[str]:
        name = self.require(column)
        cells = self.table[name]
        if None in cells:  # a .jsonl line without the key its first line has
            raise KoGPT2Error(f"{self.path} line {cells.index(None) + 1} has no key '{name}'; every line needs it")
        return cells


class CsvColumn:
    """The texts of one column: every non-empty cell exactly as written (line breaks and last characters included),
    and their token ids, cached next to the data file."""

    def __init__(self, path: str | Path | CsvFile, column: str = TEXT_COLUMN, encoding: str | None = None,
                 alternatives: tuple[str, ...] = ()) -> None:
        self.file = path if isinstance(path, CsvFile) else CsvFile(path, encoding)
        self.column = self.file.require(column, alternatives=tuple(alternatives))
        self._counts: tuple[int, int] | None = None

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def sha256(self) -> str:
        return self.file.sha256

    @property
    def encoding(self) -> str:
        return self.file.encoding

    @cached_property
    def texts(self) -> list[str]:
        cells = self.file.cells(self.column)
        texts = [cell for cell in cells if cell.strip()]
        if not texts:
            what, rows = ("key", "lines") if self.file.format == "jsonl" else ("column", "rows")
            raise KoGPT2Error(f"{self.path}: {what} '{self.column}' has no text in any of its {len(cells)} {rows}")
        self._counts = (len(cells), len(cells) - len(texts))
        return texts

    def _row_counts(self) -> tuple[int, int]:
        if self._counts is None:
            self.texts  # parsing counts the rows; a cache hit knows them already
        return self._counts

    @property
    def rows_read(self) -> int:
        return self._row_counts()[0]

    @property
    def rows_empty(self) -> int:
        return self._row_counts()[1]

    def token_rows(self, tokenizer: Tokenizer, cache: bool = True) -> TokenizedRows:
        """Each text as bos + tokens + eos. Cached in one hidden file next to the CSV (``.NAME.kogpt2cache.npz``)
        under a key of the file's bytes and the tokenizer, so the next run on the same data skips parsing and
        tokenising (seconds instead of a minute for a million rows); ``cache=False`` neither reads nor writes it."""
        key = hashlib.sha256(b"\0".join([self.sha256.encode(), tokenizer.data, self.column.encode(),
                                          (self.file.requested_encoding or "auto").encode(),
                                          self.file.layout.encode()])).hexdigest()
        target = cache_path(self.path)
        if cache and target.is_file():
            try:
                with np.load(target) as stored:
                    if str(stored["key"]) == key:
                        self._counts = (int(stored["rows_read"]), int(stored["rows_empty"]))
                        return TokenizedRows(stored["ids"], stored["offsets"])
            except Exception:  # a damaged cache is only a cache: rebuild it
                target.unlink(missing_ok=True)
        rows = tokenize_rows(self.texts, tokenizer)
        if cache:
            _save_cache(target, key, rows, self.rows_read, self.rows_empty)
        return rows


def cache_path(csv_path: Path) -> Path:
    return csv_path.with_name(f".{csv_path.name}.kogpt2cache.npz")


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


def _save_cache(target: Path, key: str, rows: TokenizedRows, rows_read: int, rows_empty: int) -> None:
    """Atomic, under a temporary name of its own (several torchrun ranks may write the same cache at once), and
    readable like any file the user makes."""
    try:
        fd, name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    except OSError:  # a read-only data folder: work without the cache
        return
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as file:
            np.savez(file, key=key, ids=rows.ids, offsets=rows.offsets, rows_read=rows_read, rows_empty=rows_empty)
        os.replace(tmp, target)
    except OSError:  # a read-only data folder: work without the cache
        tmp.unlink(missing_ok=True)
