"""How nora's messages reach the person running a command.

Every nora module that reports something has one ``log = logging.getLogger(__name__)`` and never configures
logging: that is left to the command. Each command-line entry point configures it once, here:

* ``python -m nora.demo``, ``nora.demo.llm``, ``nora.results``, ``nora.bench`` and ``scripts/*.py`` call
  :func:`setup_logging` first thing in ``main``;
* ``train.py`` and ``eval.py`` run under ``@hydra.main``, which configures logging itself from
  ``configs/hydra/job_logging/nora.yaml`` (console + the run's ``train.log``) and ``nora_console.yaml`` (console
  only, eval.py): both name :class:`ConsoleHandler` for the console, so a message reads the same everywhere.

On the console an INFO line is the message as it is (what a ``print`` showed before), on stdout; a warning or an
error is ``warning: ...`` / ``error: ...`` on stderr, next to the ``error:`` line of :func:`nora.errors.user_errors`
and Python's own warnings. Output that *is* a command's product (a table it was asked to print, JSON for a pipe)
is printed, not logged.
"""

from __future__ import annotations

import logging
import sys

# the loggers a command shows at INFO: nora's modules and a script's own (``__name__`` is "__main__" there);
# everything else keeps Python's default (WARNING and above)
SHOWN_AT_INFO = ("nora", "__main__")


class ConsoleFormatter(logging.Formatter):
    """``%(message)s`` below WARNING; ``warning: %(message)s`` / ``error: %(message)s`` from WARNING up."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        return text


class ConsoleHandler(logging.Handler):
    """INFO and below to stdout, WARNING and above to stderr, formatted by :class:`ConsoleFormatter` and flushed
    line by line (so they interleave with tqdm's bars). The stream is looked up when a record is written, so a
    redirected ``sys.stdout`` (pytest's capture, ``contextlib.redirect_stdout``) gets the line."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.setFormatter(ConsoleFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Configure logging for a command-line entry point (not under Hydra): one :class:`ConsoleHandler` on the root
    logger and ``level`` for nora's loggers and the script's own. Calling it again changes nothing but the level."""
    root = logging.getLogger()
    if not any(isinstance(h, ConsoleHandler) for h in root.handlers):
        root.addHandler(ConsoleHandler())
    for name in SHOWN_AT_INFO:
        logging.getLogger(name).setLevel(level)
