"""A Hydra callback (``hydra.callbacks`` in configs/train.yaml): an output directory that cannot be written
(read-only file system, no permission, a full disk) is one line and exit status 2 before Hydra itself creates
it, writes ``.hydra/`` and opens its log file there (each of which would otherwise end in a traceback).

``.hydra/`` itself is written by :func:`write_hydra_record` once the run's lock is held (``configs/train.yaml`` sets
``hydra.output_subdir: null``): Hydra would write it before the job starts, so a second process refused by the
lock would already have replaced the live run's ``.hydra/config.yaml`` with its own configuration."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from nora.errors import WRITE_ERRNOS, OutputError
from nora.files import write_text_atomic
from nora.runs.layout import run_name_problem

HYDRA_DIR = ".hydra"

# below this, Hydra's own files and the first metrics lines may not fit: refuse before starting
MIN_FREE_BYTES = 1 << 20


class WritableOutputs(Callback):
    def on_run_start(self, config, **kwargs) -> None:
        why = run_name_problem(str(config.run_name)) if "run_name" in config else None
        if why is not None:  # before Hydra creates ${output_root}/${run_name}, wherever that is
            _exit(why)
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


def write_hydra_record(cfg: DictConfig, run_dir: Path) -> None:
    """``<run_dir>/.hydra/{config,hydra,overrides}.yaml``, what Hydra writes there, for a job Hydra launched into
    ``run_dir``; call it holding the run's lock. Nothing outside a Hydra job or for another directory."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if Path(hydra_cfg.runtime.output_dir).resolve() != Path(run_dir).resolve():
        return
    task = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    out = Path(run_dir) / HYDRA_DIR
    write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(task))
    write_text_atomic(out / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    write_text_atomic(out / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))
