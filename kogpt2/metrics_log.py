"""``metrics.jsonl`` (one JSON line per optimizer step) and, optionally, TensorBoard: what a run logs as it goes."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import KoGPT2Error

METRICS_NAME = "metrics.jsonl"


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise KoGPT2Error("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(folder / "tensorboard"))


class MetricsLog:
    """Appends each step's numbers; a run that starts at step k (a resume) first forgets the lines past k."""

    def __init__(self, folder: Path, tensorboard: bool) -> None:
        self.folder = Path(folder)
        self.path = self.folder / METRICS_NAME
        self.tensorboard = _tensorboard_writer(self.folder) if tensorboard else None

    def write(self, **values) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(values, ensure_ascii=False) + "\n")
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
        self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
