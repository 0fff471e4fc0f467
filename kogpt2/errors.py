"""The one exception a user can cause, and how every CLI reports it."""
from __future__ import annotations

import errno
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TextIO


class KoGPT2Error(Exception):
    """A problem the user can fix: the message says what is wrong and what to do."""


class WriteFailed(KoGPT2Error):
    """A file could not be written (a full disk): the work stops there, even where a bad prompt would not."""


def report_errors(work: Callable[[], int], interrupted: int = 130, interrupted_message: str | None = None) -> int:
    """Run a CLI's work: a KoGPT2Error becomes one ``error: ...`` line and exit code 2, never a traceback; output
    whose reader has gone (``| tee log``, then Ctrl-C) never stops the work."""
    with _outputs_that_may_close():
        try:
            return work()
        except KoGPT2Error as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if interrupted_message:
                print(interrupted_message, file=sys.stderr)
            return interrupted


def write_error(path: str | Path, error: OSError, then: str, what: str = "") -> WriteFailed:
    """A write that failed, as one line: the file, why (a full disk says how much room is left, and where) and
    what to do; ``then`` says how to go on once that is done (e.g. "resume with --load_path ...")."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    if error.errno == errno.ENOSPC:
        why, fix = f"the disk is full ({_free_space(path.parent)})", "free space"
    elif error.errno == errno.EDQUOT:
        why, fix = "your disk quota is used up", "free space"
    elif error.errno == errno.EFBIG:
        why = "the file is larger than this system allows (the file size limit, ulimit -f, or a FAT32 disk's 4 GB)"
        fix = "raise the limit or write to another disk"
    else:
        why, fix = error.strerror or str(error), "fix that"
    return WriteFailed(f"could not write {name}: {why}; {fix}, then {then}")


@contextmanager
def writing(path: str | Path, then: str, what: str = "") -> Iterator[None]:
    """Around a write: an OSError (a full disk) becomes ``write_error``'s one line instead of a traceback."""
    try:
        yield
    except OSError as error:
        raise write_error(path, error, then, what) from None


def write_whole(path: str | Path, data: bytes, then: str = "run it again", what: str = "") -> None:
    """``data`` as the whole of ``path``, or nothing: written beside it, then renamed over it, so a full disk leaves
    no half file (and the old one, if there was one); a failure is ``write_error``'s one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, then, what):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class KeptWriteErrors:
    """The file torch.save writes through: torch's zip writer turns a failed write (a full disk) into "unexpected
    pos" and drops the OSError, so the first one is kept here to say what really went wrong."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.file.flush()


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return f"in {folder}"
    return f"{free / 1e6:.{1 if free < 1e7 else 0}f} MB free in {folder}"


class _ClosedPipeSafe:
    """stdout or stderr whose reader may go away: the first BrokenPipeError points the stream at os.devnull (as
    Python's docs advise for SIGPIPE) and the work goes on silently, e.g. a training run to its final checkpoint."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        """Later writes, the buffered rest and the interpreter's flush at exit all go to os.devnull."""
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError):  # no file descriptor (an in-memory stream): nothing was written anywhere
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextmanager
def _outputs_that_may_close() -> Iterator[None]:
    saved = sys.stdout, sys.stderr
    guarded = [None if stream is None else _ClosedPipeSafe(stream) for stream in saved]  # None: started closed
    sys.stdout, sys.stderr = guarded
    try:
        yield
    finally:
        for stream in guarded:
            if stream is not None:
                stream.flush()  # what is still buffered meets a closed pipe here, not in the interpreter's exit
        sys.stdout, sys.stderr = saved
