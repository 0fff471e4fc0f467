"""``metrics.jsonl`` (one JSON line per optimizer step) and, optionally, TensorBoard: what a run logs as it goes."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..errors import KoGPT2Error, writing

METRICS_NAME = "metrics.jsonl"


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise KoGPT2Error("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(folder / "tensorboard"))


class MetricsLog:
    """Appends each step's numbers; a run that starts at step k (a resume) first forgets the lines past k."""

    def __init__(self, folder: Path, tensorboard: bool, go_on: Callable[[], str]) -> None:
        """``go_on`` says how to continue if a write fails (a full disk): the run stops with that, in one line."""
        self.folder = Path(folder)
        self.path = self.folder / METRICS_NAME
        self.tensorboard = _tensorboard_writer(self.folder) if tensorboard else None
        self.go_on = go_on

    def write(self, **values) -> None:
        line = (json.dumps(values, ensure_ascii=False) + "\n").encode("utf-8")
        with writing(self.path, self.go_on()):
            self.folder.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab", buffering=0) as file:
                end = file.tell()
                try:
                    written = 0
                    while written < len(line):
                        written += file.write(line[written:])
                except OSError:
                    file.truncate(end)  # never half a line: the log stays readable by a resume and the plot
                    raise
        if self.tensorboard is not None:
            for name, value in values.items():
                if name != "step":
                    self.tensorboard.add_scalar(name, value, values["step"])
            self.tensorboard.flush()

    def trim(self, step: int) -> None:
        """Keep the lines up to ``step``, so the log has each step once."""
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(keep) < len(lines):
            tmp = self.path.with_name(f".{METRICS_NAME}.tmp")
            with writing(self.path, self.go_on()):
                try:  # all or nothing: a full disk keeps the whole log
                    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
                    os.replace(tmp, self.path)
                finally:
                    tmp.unlink(missing_ok=True)

    def write_sample(self, folder: str, step: int, text: str) -> None:
        """The sample drawn at ``step``, as ``sample_step<step>.txt`` in ``folder`` (--samples)."""
        path = Path(folder) / f"sample_step{step}.txt"
        with writing(path, self.go_on()):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")
