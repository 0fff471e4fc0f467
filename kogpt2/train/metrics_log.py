"""``metrics.jsonl`` (one JSON line per optimizer step) and, optionally, TensorBoard: what a run logs as it goes."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from ..defaults import METRICS_FLUSH_SECONDS
from ..errors import KoGPT2Error, write_whole, writing

METRICS_NAME = "metrics.jsonl"


def _append_line(file, line: bytes) -> None:
    """Never half a line: the log stays readable by a resume and the plot."""
    end = file.tell()
    try:
        written = 0
        while written < len(line):
            written += file.write(line[written:])
    except OSError:
        file.truncate(end)
        raise


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise KoGPT2Error("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(folder / "tensorboard"))


class MetricsLog:
    """Each step's numbers, kept and appended in batches (a GPU makes many steps a second: one write each would be
    a system call and, with TensorBoard, a flush per step). The first line goes to disk at once (the run has begun),
    then a batch every ``METRICS_FLUSH_SECONDS``, before each checkpoint and at the end, so the file covers every
    checkpoint's steps; a run that starts at step k (a resume) first forgets the lines past k."""

    def __init__(self, folder: Path, tensorboard: bool, go_on: Callable[[], str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``go_on`` says how to continue if a write fails (a full disk): the run stops with that, in one line."""
        self.folder = Path(folder)
        self.path = self.folder / METRICS_NAME
        self.tensorboard = _tensorboard_writer(self.folder) if tensorboard else None
        self.go_on = go_on
        self.clock = clock
        self.waiting: list[dict] = []
        self.flushed_at = -float("inf")  # the first line goes at once: the log shows the run has begun

    def write(self, **values) -> None:
        self.waiting.append(values)
        if self.clock() - self.flushed_at >= METRICS_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Append the waiting lines, each whole or not at all (a refused write keeps the lines before it)."""
        waiting, self.waiting, self.flushed_at = self.waiting, [], self.clock()
        if not waiting:
            return
        with writing(self.path, self.go_on()):
            self.folder.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab", buffering=0) as file:
                for values in waiting:
                    _append_line(file, (json.dumps(values, ensure_ascii=False) + "\n").encode("utf-8"))
        if self.tensorboard is not None:
            for values in waiting:
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
        if len(keep) < len(lines):  # all or nothing: a full disk keeps the whole log
            write_whole(self.path, "".join(line + "\n" for line in keep).encode("utf-8"), self.go_on())

    def write_sample(self, folder: str, step: int, text: str) -> None:
        """The sample drawn at ``step``, as ``sample_step<step>.txt`` in ``folder`` (--samples)."""
        write_whole(Path(folder) / f"sample_step{step}.txt", (text + "\n").encode("utf-8"), self.go_on())
