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

    default_exit_code = 130

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        # the class carries its status too: OmegaConf re-raises an exception raised inside its calls (a signal handler
        # runs wherever the main thread is) as type(exc)(message + its key context), without the instance's fields
        self.exit_code = self.default_exit_code if exit_code is None else exit_code


class Terminated(Interrupted):
    """Stopped by SIGTERM (exit status 143)."""

    default_exit_code = 143


# errno values that mean "this output cannot be written here", not a bug in nora
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


@contextmanager
def user_errors():
    """Turn a :class:`UserError`, Ctrl-C, or a write that the file system refuses into one line on stderr and
    an exit status (2 for errors, 130 for Ctrl-C): no stack trace."""
    try:
        yield
    except Interrupted as exc:  # one line (OmegaConf appends its key context on lines of their own)
        print(str(exc).splitlines()[0] if str(exc) else "interrupted", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # outside the training loop (inside it, the loop raises Interrupted)
        print("interrupted; run the same command to continue", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as exc:
        stop = _interruption(exc)
        if stop is not None:  # a signal's Interrupted that another library wrapped (OmegaConf's resolvers)
            print(str(stop).splitlines()[0], file=sys.stderr, flush=True)
            sys.exit(stop.exit_code)
        if not isinstance(exc, OSError) or exc.errno not in WRITE_ERRNOS:
            raise
        # a refused write outside nora.files' atomic writes (those raise OutputError)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}[Errno {exc.errno}] {exc.strerror}", file=sys.stderr, flush=True)
        sys.exit(2)


def _interruption(exc: BaseException) -> Interrupted | None:
    """The :class:`Interrupted` in ``exc``'s chain of causes, if any."""
    for _ in range(16):
        exc = exc.__cause__ or exc.__context__
        if exc is None or isinstance(exc, Interrupted):
            return exc
    return None
