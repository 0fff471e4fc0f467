"""CSV -> texts -> token ids, cached next to the CSV (``packing.py`` turns the ids into training blocks)."""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .defaults import ANSWER_COLUMN, QUESTION_COLUMN, TEXT_COLUMN
from .errors import KoGPT2Error
from .tokenizer import Tokenizer

ENCODINGS = ("utf-8-sig", "cp949")  # UTF-8 (with or without BOM), then Korean Excel exports (CP949 covers EUC-KR)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KoGPT2Error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise KoGPT2Error(f"{path} is a folder; give a CSV file") from None
    except OSError as error:
        raise KoGPT2Error(f"{path}: cannot read ({error.strerror})") from None


def decode(raw: bytes, path: Path, encoding: str | None) -> tuple[str, str]:
    """The text and the encoding it was in: ``encoding`` if given, else UTF-8 (BOM or not), then CP949/EUC-KR.
    A binary file is named as such, not as a wrong encoding."""
    if encoding:
        try:
            return raw.decode(encoding), encoding
        except LookupError:
            raise KoGPT2Error(f"unknown encoding '{encoding}' (try utf-8 or cp949)") from None
        except UnicodeDecodeError as error:
            raise KoGPT2Error(f"{path} is not valid {encoding} (byte {error.start}); try --encoding utf-8 or cp949") from None
    if b"\x00" in raw or _looks_binary(raw):
        raise KoGPT2Error(f"{path} is a binary file, not text; give a CSV (or text file) saved as UTF-8 or CP949")
    for candidate in ENCODINGS:
        try:
            return raw.decode(candidate), "utf-8" if candidate == "utf-8-sig" else candidate
        except UnicodeDecodeError:
            continue
    raise KoGPT2Error(f"{path} is neither UTF-8 nor CP949/EUC-KR text; save it as UTF-8 or name its encoding with "
                      "--encoding")


def _looks_binary(raw: bytes) -> bool:
    """Control bytes other than tab, line breaks and form feed are rare in any text encoding."""
    sample = raw[:4096]
    controls = sum(b < 32 and b not in (9, 10, 12, 13) for b in sample)
    return bool(sample) and controls / len(sample) > 0.05


def _separator(text: str, path: Path) -> str:
    """Tab for a .tsv or a header with tabs and no commas; else comma."""
    header = text.split("\n", 1)[0]
    return "\t" if path.suffix.lower() == ".tsv" or ("\t" in header and "," not in header) else ","


class CsvFile:
    """A CSV read, checksummed, decoded and its header checked once, when opened (before minutes go into loading a
    model); its cells parsed only when asked for."""

    def __init__(self, path: str | Path, encoding: str | None = None) -> None:
        self.path = Path(path)
        raw = _read_bytes(self.path)
        self.sha256 = hashlib.sha256(raw).hexdigest()  # recorded in checkpoints
        self.text, self.encoding = decode(raw, self.path, encoding)
        self.requested_encoding = encoding
        if not self.text.strip():
            raise KoGPT2Error(f"{self.path} is empty: it needs a header row and one text per row")
        self.sep = _separator(self.text, self.path)
        self.columns = [str(c) for c in self._read(nrows=0).columns]

    def _read(self, nrows: int | None = None):
        import pandas as pd

        try:
            return pd.read_csv(io.StringIO(self.text), sep=self.sep, dtype=str, keep_default_na=False,
                               na_filter=False, nrows=nrows)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise KoGPT2Error(f"{self.path} is not a readable CSV: {first}") from None

    def require(self, column: str, flag: str = "--column", alternatives: tuple[str, ...] = ()) -> str:
        """``column``, else the first of ``alternatives`` the file has; a missing one is named with what to do."""
        for name in (column, *alternatives):
            if name in self.columns:
                return name
        found = ", ".join(self.columns) or "none"
        hint = f"choose one with {flag}"
        if {QUESTION_COLUMN, ANSWER_COLUMN} <= set(self.columns) and flag == "--column":
            hint = "this looks like a question/answer CSV: train a chatbot with --chat"
        raise KoGPT2Error(f"{self.path} has no column '{column}' (columns found: {found}); {hint}")

    @cached_property
    def frame(self):
        return self._read()

    def cells(self, column: str) -> list[str]:
        return self.frame[self.require(column)].tolist()


class CsvColumn:
    """The texts of one column: every non-empty cell exactly as written (line breaks and last characters included),
    and their token ids, cached next to the CSV."""

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
            raise KoGPT2Error(f"{self.path}: column '{self.column}' has no text in any of its {len(cells)} rows")
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
                                          (self.file.requested_encoding or "auto").encode()])).hexdigest()
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
