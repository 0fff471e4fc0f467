"""How much of the generated text is new: copy rate, longest run shared with the training text, diversity."""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..corpus.tokenizer import Tokenizer
from ..errors import KoGPT2Error, write_whole

if TYPE_CHECKING:
    from ..store.checkpoint import CheckpointRecord
    from .outputs import Sample

SEPARATOR = "\x00"


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class RunIndex:
    """Finds the longest run of units (words or token ids) that a sequence shares with any training row."""

    def __init__(self, rows: list[list]) -> None:
        self.rows = rows
        self.positions: dict = defaultdict(list)
        for r, row in enumerate(rows):
            for p, unit in enumerate(row):
                self.positions[unit].append((r, p))

    def longest_shared(self, units: list) -> int:
        best = 0
        for i in range(len(units)):
            if len(units) - i <= best:
                break
            for r, p in self.positions.get(units[i], ()):
                row = self.rows[r]
                n = 1
                while i + n < len(units) and p + n < len(row) and units[i + n] == row[p + n]:
                    n += 1
                best = max(best, n)
        return best


class TrainingText:
    """The training column, indexed for copy checks by words and by tokens."""

    def __init__(self, texts: list[str], tokenizer: Tokenizer) -> None:
        self.joined = SEPARATOR + SEPARATOR.join(normalise(t) for t in texts) + SEPARATOR
        self.words = RunIndex([normalise(t).split(" ") for t in texts])
        self.tokens = RunIndex(tokenizer.encode_batch(texts))
        self.tokenizer = tokenizer

    def is_copy(self, text: str) -> bool:
        """The sample appears verbatim in a training row (whitespace aside)."""
        sample = normalise(text)
        return bool(sample) and sample in self.joined

    def measure(self, text: str) -> dict:
        return {"copy": self.is_copy(text),
                "longest_shared_words": self.words.longest_shared(normalise(text).split(" ")),
                "longest_shared_tokens": self.tokens.longest_shared(self.tokenizer.encode(text))}


def training_text_for(record: CheckpointRecord | None, data_file_path: str | None, column: str,
                      tokenizer: Tokenizer, data_format: str | None = None, txt_unit: str | None = None) -> TrainingText:
    """``--data_file_path``, else the file the checkpoint was trained on (refused if it changed since), read as the
    run read it unless ``data_format``/``txt_unit`` say otherwise. The text column is the one the checkpoint was
    trained on, else ``column``."""
    from ..corpus.reading import CsvColumn
    from ..store.checkpoint import open_like_run

    recorded_path = record.data_path if record else None
    path = data_file_path or recorded_path
    if not path:
        raise KoGPT2Error("no training text to compare with: give --data_file_path")
    if not Path(path).is_file():
        hint = "" if data_file_path else " (the checkpoint's training CSV, relative to where main.py ran)"
        raise KoGPT2Error(f"{path}: no such file{hint}; give the training CSV with --data_file_path")
    columns = [c for c in (record.column if record else None, column) if c]
    csv = CsvColumn(open_like_run(path, None, data_format, txt_unit, record), columns[0], alternatives=columns[1:])
    if not data_file_path and record.data_sha256 and record.data_sha256 != csv.sha256:
        raise KoGPT2Error(f"{path} changed since the checkpoint was trained on it; give --data_file_path explicitly")
    return TrainingText(csv.texts, tokenizer)


def copy_check(training: TrainingText, copy_words: int) -> Callable[[str], bool]:
    """``--no_copy``: a sample passes if it is no training row and shares at most ``copy_words`` words in a row."""
    def new_text(text: str) -> bool:
        return not training.is_copy(text) and training.words.longest_shared(normalise(text).split(" ")) <= copy_words

    return new_text


def distinct_n(texts: list[str], n: int) -> float:
    """Share of distinct word n-grams among all word n-grams of the samples (1.0: no repetition at all)."""
    grams = [tuple(words[i:i + n]) for words in (normalise(t).split(" ") for t in texts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def summarise(samples: list[dict]) -> dict:
    texts = [s["text"] for s in samples]
    count = max(1, len(samples))
    return {
        "samples": len(samples),
        "copy_rate": sum(s["copy"] for s in samples) / count,
        "mean_longest_shared_words": sum(s["longest_shared_words"] for s in samples) / count,
        "mean_longest_shared_tokens": sum(s["longest_shared_tokens"] for s in samples) / count,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
    }


def write_report(path: str, samples: list[Sample], training: TrainingText, source: str) -> None:
    """Per sample: copy or not, longest run shared with the training text (words, tokens); then averages and
    distinct-1/2 over all samples."""
    rows = [{"prompt": s.prompt, "text": s.text, "seed": s.seed, "sample_index": s.index, **training.measure(s.text)}
            for s in samples]
    summary = summarise(rows)
    report = {"checkpoint": source, "settings": samples[0].settings.to_dict() if samples else {},
              "summary": summary, "samples": rows}
    write_whole(path, json.dumps(report, ensure_ascii=False, indent=1).encode("utf-8"))
    print(f"report: {summary['samples']} samples, copy rate {summary['copy_rate']:.2f}, longest shared run "
          f"{summary['mean_longest_shared_words']:.1f} words on average, distinct-1 {summary['distinct_1']:.2f}, "
          f"distinct-2 {summary['distinct_2']:.2f} -> {path}")
