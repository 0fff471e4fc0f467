"""The one exception a user can cause, and how every CLI reports it."""
from __future__ import annotations

import sys
from typing import Callable


class KoGPT2Error(Exception):
    """A problem the user can fix: the message says what is wrong and what to do."""


def report_errors(work: Callable[[], int], interrupted: int = 130, interrupted_message: str | None = None) -> int:
    """Run a CLI's work: a KoGPT2Error becomes one ``error: ...`` line and exit code 2, never a traceback."""
    try:
        return work()
    except KoGPT2Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted_message:
            print(interrupted_message, file=sys.stderr)
        return interrupted
