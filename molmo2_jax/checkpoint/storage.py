"""Disk facts for writers of checkpoints and conversions: free space, and one readable line for a storage error.

Orbax and TensorStore report a failed read or write as a chain of exceptions whose outermost message can be a
multi-line TensorStore spec; the line a user needs (which file, which OS error) is the innermost cause's first.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import traceback
import warnings
from pathlib import Path

from molmo2_jax.errors import Molmo2Error


class NoSpaceError(OSError, Molmo2Error):  # OSError first: it sets errno and strerror
    """Not enough free space at a destination (before or while writing)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def size_text(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception `error` was raised from or while handling (not past a `raise ... from None`)."""
    while (cause := error.__cause__ or (None if error.__suppress_context__ else error.__context__)) is not None:
        error = cause
    return error


def is_no_space(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a full disk: ENOSPC from Python or TensorStore."""
    for e in (error, root_cause(error)):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or "RESOURCE_EXHAUSTED" in str(e):
            return True
    return False


def error_line(error: BaseException) -> str:
    """The first line of the innermost cause of `error` (e.g. TensorStore's 'Error reading ... in file ...')."""
    cause = root_cause(error)
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


def check_free_space(path: Path, needed: int, what: str) -> None:
    """Raise NoSpaceError (one line: what, where, needed and free bytes) unless `needed` bytes fit at `path`."""
    free = free_bytes(path)
    if free < needed:
        raise NoSpaceError(f"{path}: not enough free space for {what}: needs {size_text(needed)}, "
                           f"{size_text(free)} free")


class OrbaxErrorFilter(logging.Filter):
    """Drops the tracebacks Orbax's writer threads log for a failed write (to the `absl` logger): the failure is
    raised to the caller too, which reports it in one line. Creating one also drops, for the rest of the process,
    what the writes still in flight when Orbax gives up print later: TensorStore's calls back into Orbax's event
    loop, closed by then (unraisable `RuntimeError('Event loop is closed')`s), asyncio's '... exception was
    never retrieved' for Orbax's write tasks and the futures gathering them, and the 'coroutine ... was never
    awaited' warning for the writes Orbax never started."""

    def __init__(self):
        super().__init__()
        if getattr(sys.unraisablehook, "__wrapped__", None) is None:
            sys.unraisablehook = _without_closed_loop_callbacks(sys.unraisablehook)
            logging.getLogger("asyncio").addFilter(_orbax_tasks_never_retrieved)
            warnings.filterwarnings("ignore", r"coroutine 'async_serialize_from_host\.", RuntimeWarning)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


def _orbax_tasks_never_retrieved(record: logging.LogRecord) -> bool:
    """False for asyncio's 'Task (or _GatheringFuture, ...) exception was never retrieved' of an Orbax write
    (logged when the task or future is collected, after the failed write was already reported). Orbax shows in
    the task's repr, or only in the exception's traceback for a gathering future."""
    message = record.getMessage()
    if " exception was never retrieved" not in message.split("\n", 1)[0]:
        return True
    if record.exc_info:
        message += "".join(traceback.format_exception(*record.exc_info))
    return f"{os.sep}orbax{os.sep}" not in message


def _without_closed_loop_callbacks(hook):
    def quiet(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            hook(unraisable)
    quiet.__wrapped__ = hook
    return quiet


@contextlib.contextmanager
def reporting_write_errors(dst: Path, what: str):
    """Orbax's logged tracebacks silenced, and a full disk while writing `dst` raised as one NoSpaceError line
    (callers clean up their partial output before this reports)."""
    quiet = OrbaxErrorFilter()
    logging.getLogger("absl").addFilter(quiet)
    try:
        yield
    except Exception as e:
        if not is_no_space(e):
            raise
        raise NoSpaceError(f"{dst}: the disk filled up during {what}; nothing was left behind "
                           f"({size_text(free_bytes(dst))} free without it)") from None
    finally:
        logging.getLogger("absl").removeFilter(quiet)
