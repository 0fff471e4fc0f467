"""What generation leaves behind: one file per sample (``--samples``) and batch results (``--output`` CSV/JSONL),
each carrying what regenerates it; and reading a file of prompts (``--prompts``)."""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..defaults import DATA_FORMAT, SamplingSettings
from ..errors import KoGPT2Error, write_whole

OUTPUT_SUFFIXES = (".csv", ".jsonl")


@dataclass
class Sample:
    prompt: str
    text: str
    index: int
    num_samples: int
    seed: int
    settings: SamplingSettings


def read_prompts(path: str, column: str, encoding: str | None = None) -> list[str]:
    """A CSV's or TSV's column, a .jsonl's key, else one prompt a line; in any encoding the training data may have."""
    from ..corpus.formats import SUFFIX_FORMATS
    from ..corpus.reading import CsvColumn, CsvFile

    table = SUFFIX_FORMATS.get(Path(path).suffix.lower()) in ("csv", "tsv", "jsonl")
    return CsvColumn(CsvFile(path, encoding, DATA_FORMAT if table else "txt", "line"), column).texts


def check_output_path(path: str) -> None:
    if Path(path).suffix.lower() not in OUTPUT_SUFFIXES:
        raise KoGPT2Error(f"--output {path}: write to a .csv (opens in Excel) or a .jsonl file")


def write_rows(path: str, samples: list[Sample], source: str) -> None:
    """Every sample with what regenerates it: prompt, index, seed, checkpoint and settings."""
    write_table(path, [{"prompt": s.prompt, "text": s.text, "sample_index": s.index, "num_samples": s.num_samples,
                        "seed": s.seed, "checkpoint": source, **s.settings.to_dict()} for s in samples])


def write_table(path: str, rows: list[dict]) -> None:
    """CSV as UTF-8 with BOM (Excel shows Korean right; lists as JSON in a cell) or JSONL (lists as lists); whole or
    not at all (a full disk is one line)."""
    check_output_path(path)
    if Path(path).suffix.lower() == ".jsonl":
        write_whole(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
        return
    cells = [{k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v for k, v in row.items()}
             for row in rows]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(cells[0]) if cells else ["prompt", "text"])
    writer.writeheader()
    writer.writerows(cells)
    write_whole(path, table.getvalue().encode("utf-8-sig"))


def save_sample_file(folder: str, sample: Sample, source: str) -> Path:
    """Like the original: one file per result, its first line the checkpoint, prompt and settings."""
    header = {"checkpoint": source, "prompt": sample.prompt, "seed": sample.seed, "sample": sample.index,
              **sample.settings.to_dict()}
    path = Path(folder) / f"sample_{time.strftime('%Y%m%d_%H%M%S')}_{time.monotonic_ns() % 10**9:09d}.txt"
    write_whole(path, (json.dumps(header, ensure_ascii=False) + "\n" + sample.text + "\n").encode("utf-8"))
    return path
