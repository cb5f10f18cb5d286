"""Command-line helpers shared by train.py, eval.py and the demo."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from nora.errors import UserError


@contextmanager
def user_errors():
    """Turn a :class:`UserError` into one line on stderr and exit status 2 (no stack trace)."""
    try:
        yield
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
