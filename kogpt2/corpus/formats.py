"""How a data file's bytes become a table of text columns: its encoding found (UTF-16 with a byte-order mark, UTF-8,
CP949/EUC-KR, or named as binary), its format by suffix, and each format parsed (a CSV or TSV into its columns, a
.jsonl into its keys, a .txt into lines or paragraphs). ``data.py`` opens files through these."""
from __future__ import annotations

import codecs
import io
import json
from pathlib import Path

from ..defaults import DATA_FORMAT, TXT_PARAGRAPH_LINES, TXT_UNIT
from ..errors import KoGPT2Error

ENCODINGS = ("utf-8-sig", "cp949")  # UTF-8 (with or without BOM), then Korean Excel exports (CP949 covers EUC-KR)
SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "txt", ".jsonl": "jsonl"}  # any other suffix: csv
JSONL_LINE = 'one JSON object, such as {"text": "..."}'
NEEDS = {"csv": "a header row and one text per row", "tsv": "a header row and one text per row",
         "txt": "one text per line", "jsonl": f"on each line {JSONL_LINE}"}


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KoGPT2Error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise KoGPT2Error(f"{path} is a folder; give a data file (.csv, .tsv, .txt or .jsonl)") from None
    except OSError as error:
        raise KoGPT2Error(f"{path}: cannot read ({error.strerror})") from None


def decode(raw: bytes, path: Path, encoding: str | None) -> tuple[str, str]:
    """The text and the encoding it was in: ``encoding`` if given, else UTF-16 with a byte-order mark (Excel's
    "Unicode text"), UTF-8 (BOM or not), then CP949/EUC-KR. A binary file is named as such, not as a wrong encoding."""
    if encoding:
        try:
            return raw.decode(encoding), encoding
        except LookupError:
            raise KoGPT2Error(f"unknown encoding '{encoding}' (try utf-8 or cp949)") from None
        except UnicodeDecodeError as error:
            raise KoGPT2Error(f"{path} is not valid {encoding} (byte {error.start}); try --encoding utf-8 or cp949") from None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # its NUL bytes are text, not binary
        try:
            return raw.decode("utf-16"), "utf-16"
        except UnicodeDecodeError as error:
            raise KoGPT2Error(f"{path} starts with a UTF-16 byte-order mark but is not valid UTF-16 (byte "
                              f"{error.start}); save it again as UTF-8 or Unicode text") from None
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


def _lines(text: str) -> list[str]:
    """The lines as an editor numbers them (any line ending; no empty line after the last line break)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def detect_format(path: Path, text: str, requested: str = DATA_FORMAT) -> str:
    """``requested``, or by suffix (other suffixes: csv). A .txt whose first line has tabs between cells is a table:
    Excel saves "Unicode text" and "Text (tab delimited)" so."""
    if requested != "auto":
        return requested
    found = SUFFIX_FORMATS.get(path.suffix.lower(), "csv")
    return "tsv" if found == "txt" and "\t" in _first_line(text).strip() else found


def text_units(text: str, unit: str = TXT_UNIT) -> tuple[list[str], str]:
    """A plain text's texts and the unit read: each line, or each paragraph (lines between blank lines, joined with
    their line breaks). ``auto`` reads paragraphs when blank lines separate blocks, some of several lines, of at most
    ``TXT_PARAGRAPH_LINES`` lines on average (poems, articles); otherwise lines, so a few stray blank lines in a file
    of one text per line change nothing."""
    lines = _lines(text)
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    blocks = [block for block in blocks if block]
    if unit == "auto":
        in_blocks = sum(len(block) for block in blocks)
        separated = len(blocks) > 1 and in_blocks > len(blocks)  # blank lines between blocks, some of several lines
        unit = "paragraph" if separated and in_blocks <= TXT_PARAGRAPH_LINES * len(blocks) else "line"
    return (["\n".join(block) for block in blocks] if unit == "paragraph" else lines), unit


def jsonl_table(text: str, path: Path, nrows: int | None) -> dict[str, list[str | None]]:
    """Keys as columns, one row per line (a blank line: an empty row); a key missing on a line is None there.
    ``nrows=0``: the columns are the first object's keys (its "header")."""
    objects: list[dict | None] = []
    for number, line in enumerate(_lines(text), 1):
        if not line.strip():
            objects.append(None)
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise KoGPT2Error(f"{path} line {number} is not valid JSON ({error.msg}, column {error.colno}); each "
                              f"line must be {JSONL_LINE}") from None
        if not isinstance(value, dict):
            raise KoGPT2Error(f"{path} line {number} is not a JSON object; each line must be {JSONL_LINE}")
        objects.append(value)
        if nrows == 0:
            return {str(key): [] for key in value}
    keys = dict.fromkeys(key for o in objects if o for key in o)
    return {str(key): ["" if o is None else _cell(o[key]) if key in o else None for o in objects] for key in keys}


def _cell(value) -> str:
    return value if isinstance(value, str) else "" if value is None else json.dumps(value, ensure_ascii=False)


def csv_table(text: str, path: Path, data_format: str, nrows: int | None) -> dict[str, list[str]]:
    """A CSV's (or TSV's) columns, every cell as written; tab-separated also when the header has tabs and no commas."""
    import pandas as pd

    header = _first_line(text)
    sep = "\t" if data_format == "tsv" or ("\t" in header and "," not in header) else ","
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, na_filter=False, nrows=nrows)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KoGPT2Error(f"{path} is not a readable CSV: {first}") from None
    return {str(name): frame[name].tolist() for name in frame.columns}
