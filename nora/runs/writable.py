"""A Hydra callback (``hydra.callbacks`` in configs/train.yaml): an output directory that cannot be written
(read-only file system, no permission, a full disk) is one line and exit status 2 before Hydra itself creates
it, writes ``.hydra/`` and opens its log file there (each of which would otherwise end in a traceback)."""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback

from nora.errors import OutputError, WRITE_ERRNOS

# below this, Hydra's own files and the first metrics lines may not fit: refuse before starting
MIN_FREE_BYTES = 1 << 20


class WritableOutputs(Callback):
    def on_run_start(self, config, **kwargs) -> None:
        check_writable(config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        check_writable(config.hydra.sweep.dir)


def check_writable(directory: str) -> None:
    """Exit with one line if ``directory`` (or, while it does not exist yet, the nearest folder above it that
    does) cannot be written to, or its disk is (nearly) full. Creates nothing: Hydra creates the directory."""
    path = Path(directory).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
        free = shutil.disk_usage(existing).free
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        _exit(str(OutputError.from_os_error(exc, path)))
    if free < MIN_FREE_BYTES:
        _exit(f"cannot write {path}: [Errno 28] No space left on device ({free} bytes free)")


def _exit(message: str) -> None:
    # SystemExit, not an exception: Hydra would print an exception raised here with a stack trace
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
