"""Ctrl-C and SIGTERM during training: the step finishes, a checkpoint is written, the run says how to resume."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field


@dataclass
class StopRequest:
    """Set by SIGINT/SIGTERM; the loop finishes its step, saves, and returns."""

    signal: int | None = None
    handlers: dict = field(default_factory=dict)

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.handlers[sig] = signal.signal(sig, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
