"""How much of the generated text is new: copy rate, longest run shared with the training text, diversity."""
from __future__ import annotations

import re
from collections import defaultdict

from .errors import KoGPT2Error
from .tokenizer import Tokenizer

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


def training_text_from(checkpoint: dict, data_file_path: str | None, column: str, tokenizer: Tokenizer) -> TrainingText:
    """``--data_file_path``, else the CSV the checkpoint was trained on (refused if it changed since)."""
    from .data import read_text_column

    recorded = checkpoint.get("data", {})
    path = data_file_path or recorded.get("path")
    if not path:
        raise KoGPT2Error("no training text to compare with: give --data_file_path")
    column_data = read_text_column(path, recorded.get("column", column) if not data_file_path else column)
    if not data_file_path and recorded.get("sha256") and recorded["sha256"] != column_data.sha256:
        raise KoGPT2Error(f"{path} changed since the checkpoint was trained on it; give --data_file_path explicitly")
    return TrainingText(column_data.texts, tokenizer)


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
