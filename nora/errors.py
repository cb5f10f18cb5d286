"""Errors meant for the person running a command, and :func:`user_errors`, which prints them as one line
without a stack trace (train.py, eval.py and the demo run their work inside it)."""
from __future__ import annotations

import errno
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input (config value, missing file, missing weights) with an actionable message."""

    exit_code = 2


class NonFiniteLossError(UserError):
    """The loss or the weights became NaN/Inf; the last good checkpoint was left intact."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the command needs is not there (the message says where to put it)."""


class OutputError(UserError):
    """An output could not be written (disk full, read-only file system, no permission); what was there before
    (e.g. the last good checkpoint) is unchanged."""

    @classmethod
    def from_os_error(cls, exc: OSError, path) -> "OutputError":
        return cls(f"cannot write {path}: [Errno {exc.errno}] {exc.strerror or errno.errorcode.get(exc.errno, '')}")


class Interrupted(UserError):
    """The run stopped on Ctrl-C or a termination signal; the message says where it stopped and how to resume.
    Printed without the ``error:`` prefix, with the shell's exit status for the signal (128 + its number)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


# errno values that mean "this output cannot be written here", not a bug in nora
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


@contextmanager
def user_errors():
    """Turn a :class:`UserError`, Ctrl-C, or a write that the file system refuses into one line on stderr and
    an exit status (2 for errors, 130 for Ctrl-C): no stack trace."""
    try:
        yield
    except Interrupted as exc:
        print(exc, file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # outside the training loop (inside it, the loop raises Interrupted)
        print("interrupted; run the same command to continue", file=sys.stderr, flush=True)
        sys.exit(130)
    except OSError as exc:  # a refused write outside nora.files' atomic writes (those raise OutputError)
        if exc.errno not in WRITE_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}[Errno {exc.errno}] {exc.strerror}", file=sys.stderr, flush=True)
        sys.exit(2)
