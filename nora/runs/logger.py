"""Metrics to ``metrics.jsonl`` in the run directory and, with the same keys, to Weights & Biases; the ``logger``
config group's schema (:class:`LoggerConfig`)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from nora.errors import UserError
from nora.files import write_text_atomic
from nora.runs.layout import RunDir, read_stored_config
from nora.schema import load, one_of

log = logging.getLogger(__name__)

BACKENDS = ("wandb", "none")
MODES = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    """The ``logger`` group (``configs/logger/*.yaml``): W&B offline by default, or none."""

    backend: str = "none"
    mode: str = "offline"
    project: str = "nora"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)

    def __post_init__(self):
        one_of("backend", self.backend, BACKENDS)
        one_of("mode", self.mode, MODES)

    @property
    def wandb_enabled(self) -> bool:
        return self.backend == "wandb" and self.mode != "disabled"


# The W&B run a run directory logs to: written on a fresh start, read back on a resume (and by eval.py)
WANDB_RUN_ID = "run_id"


def wandb_run_id_path(run_dir: str | os.PathLike) -> Path:
    return RunDir(run_dir).wandb / WANDB_RUN_ID


# what W&B accepts as a run id (wandb.Settings refuses whitespace and :;,#?/' with a pydantic traceback); nora writes
# 16 hex digits
_RUN_ID = re.compile(r"[!-~]{1,128}")
_RESERVED = set(":;,#?/'")


def recorded_run_id(run_dir: str | os.PathLike) -> str | None:
    """The id of the W&B run a run directory logged to; None if it never logged to W&B. A run directory from
    before ids were kept in ``wandb/run_id`` used an id derived from its path. A file that holds no W&B run id
    (edited, overwritten, binary) is a :class:`UserError` naming it."""
    id_path = wandb_run_id_path(run_dir)
    if id_path.exists():
        text = id_path.read_bytes().decode("utf-8", errors="replace").strip()
        if not _RUN_ID.fullmatch(text) or _RESERVED & set(text):
            raise UserError(
                f"{id_path} holds {text[:40]!r}, not a W&B run id (printable characters without spaces "
                "or :;,#?/'); write back the id of this run's W&B run, or delete the file to log to a "
                "new W&B run"
            )
        return text
    if RunDir(run_dir).wandb.is_dir():
        return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return None


def sweep_group() -> str | None:
    """The W&B group of a Hydra multirun job: the sweep's config name (``table1``, ``ablation_rank``; ``train``
    for ``python train.py -m ...``), so every job of a sweep shares it; None outside a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return str(HydraConfig.get().job.config_name)
    except Exception:  # noqa: BLE001  (no Hydra job: no group)
        pass
    return None


def credentials_problem(cfg: LoggerConfig) -> str | None:
    """Why ``logger.mode=online`` cannot log (no W&B API key: not in WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE or a
    .netrc entry for the W&B host, as ``wandb login`` writes it), or None; checked before anything is built (W&B
    itself would fail only at ``wandb.init``, after the model and data)."""
    if not cfg.wandb_enabled or cfg.mode != "online" or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    host = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth

        if read_netrc_auth(host=host):
            return None
    except ImportError:  # another wandb version: W&B decides at wandb.init
        return None
    except Exception as exc:  # noqa: BLE001  wandb's AuthenticationError: a key that is there but malformed
        return f"logger.mode=online: the W&B API key for {host} in your .netrc is not valid ({exc})"
    return (
        f"logger.mode=online needs a W&B API key for {host} and none is set: export WANDB_API_KEY=<key> (or run "
        "`wandb login`), or log offline with logger=wandb (upload later with `wandb sync`)"
    )


def logger_config(node) -> LoggerConfig:
    """The typed ``logger`` section (None: no logging beyond ``metrics.jsonl``)."""
    return load(LoggerConfig, node if node is not None else {}, "logger")


def _init_wandb(run_dir: Path, logger_cfg: LoggerConfig, run_id: str, **kwargs):
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        tags=list(logger_cfg.tags),
        dir=str(run_dir),
        mode=logger_cfg.mode,
        id=run_id,
        resume="allow",
        settings=wandb.Settings(console="off", x_disable_stats=True),
        **kwargs,
    )


def flat_scalars(d: dict, prefix: str = "") -> dict:
    """``{"final": {"accuracy": 1}}`` -> ``{"final/accuracy": 1}``, keeping numbers, strings and booleans."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and not math.isfinite(v)):
            out[f"{prefix}{k}"] = v
    return out


class RunLogger:
    """Append-only JSON-lines metrics plus optional W&B (offline by default).

    On resume, :meth:`truncate_after` drops records written after the checkpoint's step by the
    interrupted run, so the file reads as one uninterrupted run. A fresh start is a new W&B run (a new id,
    kept in ``<run dir>/wandb/run_id``); only a resume (``resume=True``) continues the run of that id. W&B's
    name is the run name (the directory's), its group ``logger.group`` or, in a multirun, the sweep's name
    (:func:`sweep_group`). :meth:`finish` sends the summary and the images before closing the run.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        logger_cfg=None,
        config: dict | None = None,
        run_name: str | None = None,
        enabled: bool = True,
        resume: bool = False,
    ):
        self.path = RunDir(run_dir).metrics
        self.enabled = enabled
        self.wandb = None
        self.step = 0
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        logger_cfg = logger_config(logger_cfg)
        if not logger_cfg.wandb_enabled:
            return
        run_id = (recorded_run_id(run_dir) if resume else None) or uuid.uuid4().hex[:16]  # W&B ids: letters, digits
        id_path = wandb_run_id_path(run_dir)
        id_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(id_path, run_id + "\n")
        self.wandb = _init_wandb(
            Path(run_dir), logger_cfg, run_id, name=run_name, config=config, group=logger_cfg.group or sweep_group()
        )

    def truncate_after(self, step: int) -> None:
        """Keep the records up to ``step`` (rewritten atomically). A last line cut short by a crash or power
        loss is dropped with a warning; a bad line before the last is an error naming the file and line."""
        if not self.enabled or not self.path.exists():
            return
        records, torn = _read_records(self.path)
        if torn is not None:
            log.warning(f"{self.path}: dropped the half-written last line {torn[:80]!r}")
        keep = [r for r in records if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            self.step = max(self.step, int(record.get("step", 0)))
            self.wandb.log(
                {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                step=int(record.get("step", 0)),
            )

    @contextmanager
    def failing_on_error(self):
        """Close the W&B run with exit code 1 if the body raises (it stays open otherwise)."""
        try:
            yield
        except BaseException:
            self.finish(1)
            raise

    def finish(self, exit_code: int = 0, summary: dict | None = None, images: dict | None = None) -> None:
        """Close the W&B run; first send ``summary`` (nested dicts flattened to ``final/accuracy``, ...) to its
        summary and log ``images`` (``{key: png path}``) at the last step."""
        if self.wandb is None:
            return
        import wandb

        # commit the last step's row first: W&B copies a committed row into the summary, which must not
        # overwrite the run's own values of the same keys (images_per_s, data_wait_share)
        self.wandb.log(
            {k: wandb.Image(str(p)) for k, p in (images or {}).items() if Path(p).exists()}, step=self.step, commit=True
        )
        if summary:
            self.wandb.summary.update(flat_scalars(summary))
        self.wandb.finish(exit_code=exit_code)
        self.wandb = None


def log_mmlu_to_wandb(run_dir: str | os.PathLike, result: dict) -> bool:
    """Add an MMLU result (``eval.py run_dir=...``) to the summary of the training run's W&B run (the id in
    ``<run dir>/wandb/run_id``), as ``mmlu/accuracy``, ``mmlu/categories/<name>/accuracy``, ... Does nothing
    (returns False) when the run did not log to W&B."""
    stored = OmegaConf.create(read_stored_config(run_dir) or {})  # as stored: escaped values read back as written
    logger_cfg = logger_config(stored.get("logger"))
    try:
        run_id = recorded_run_id(run_dir)
    except UserError as exc:  # mmlu.json is written: a damaged id file must not fail the eval
        warnings.warn(f"MMLU not added to W&B: {exc}", stacklevel=2)
        return False
    if not logger_cfg.wandb_enabled or run_id is None:
        return False
    try:
        run = _init_wandb(Path(run_dir), logger_cfg, run_id)
        run.summary.update(flat_scalars({k: v for k, v in result.items() if k != "subjects"}, "mmlu/"))
        run.finish()
    except Exception as exc:  # noqa: BLE001  (mmlu.json is written: W&B being unreachable must not fail the eval)
        warnings.warn(f"MMLU not added to W&B run {run_id} of {run_dir}: {exc}", stacklevel=2)
        return False
    return True


def _read_records(path: Path) -> tuple[list[dict], str | None]:
    """The JSON records of a metrics file, and its last line if that one is cut short (else None)."""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return records, line
            raise UserError(
                f"{path} line {i + 1} is not a JSON record ({line[:80]!r}); remove that line, or "
                "start the run afresh with resume=null"
            ) from None
    return records, None


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (a half-written last line, from a crash or a run still writing,
    is left out)."""
    path = RunDir(run_dir).metrics
    return _read_records(path)[0] if path.exists() else []
