"""What generation leaves behind: one file per sample (``--samples``) and batch results (``--output`` CSV/JSONL),
each carrying what regenerates it; and reading a file of prompts (``--prompts``)."""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..defaults import DATA_FORMAT, SamplingSettings
from ..errors import KoGPT2Error

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
    """CSV as UTF-8 with BOM (Excel shows Korean right; lists as JSON in a cell) or JSONL (lists as lists)."""
    check_output_path(path)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix.lower() == ".jsonl":
        target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return
    cells = [{k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v for k, v in row.items()}
             for row in rows]
    with target.open("w", encoding="utf-8-sig", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(cells[0]) if cells else ["prompt", "text"])
        writer.writeheader()
        writer.writerows(cells)


def save_sample_file(folder: str, sample: Sample, source: str) -> Path:
    """Like the original: one file per result, its first line the checkpoint, prompt and settings."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    header = {"checkpoint": source, "prompt": sample.prompt, "seed": sample.seed, "sample": sample.index,
              **sample.settings.to_dict()}
    path = target / f"sample_{time.strftime('%Y%m%d_%H%M%S')}_{time.monotonic_ns() % 10**9:09d}.txt"
    path.write_text(json.dumps(header, ensure_ascii=False) + "\n" + sample.text + "\n", encoding="utf-8")
    return path
