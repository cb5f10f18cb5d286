"""Metrics to ``metrics.jsonl`` in the run directory and, with the same keys, to Weights & Biases."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from nora.files import write_text_atomic


class RunLogger:
    """Append-only JSON-lines metrics plus optional W&B (offline by default).

    On resume, :meth:`truncate_after` drops records written after the checkpoint's step by the
    interrupted run, so the file reads as one uninterrupted run. W&B runs get a stable id derived
    from the run directory, so a resumed run continues the same W&B run.
    """

    def __init__(self, run_dir: str | os.PathLike, logger_cfg=None, config: dict | None = None,
                 run_name: str | None = None, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        backend = (logger_cfg or {}).get("backend", "none") if logger_cfg is not None else "none"
        mode = (logger_cfg or {}).get("mode", "offline") if logger_cfg is not None else "disabled"
        if backend == "wandb" and mode != "disabled":
            import wandb

            run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=logger_cfg.get("project", "nora"), entity=logger_cfg.get("entity"),
                group=logger_cfg.get("group"), tags=list(logger_cfg.get("tags") or []), name=run_name,
                dir=str(run_dir), mode=mode, config=config, id=run_id, resume="allow",
                settings=wandb.Settings(console="off", x_disable_stats=True))
        elif backend not in ("wandb", "none"):
            from nora.errors import UserError
            raise UserError(f"unknown logger.backend {backend!r}; valid: wandb, none")

    def truncate_after(self, step: int) -> None:
        """Keep the records up to ``step`` (rewritten atomically). A last line cut short by a crash or power
        loss is dropped with a warning; a bad line before the last is an error naming the file and line."""
        if not self.enabled or not self.path.exists():
            return
        records, torn = _read_records(self.path)
        if torn is not None:
            print(f"warning: {self.path}: dropped the half-written last line {torn[:80]!r}")
        keep = [r for r in records if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                           step=int(record.get("step", 0)))

    def summary(self, summary: dict) -> None:
        if self.wandb is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)):
                    self.wandb.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)
            self.wandb = None


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
            from nora.errors import UserError
            raise UserError(f"{path} line {i + 1} is not a JSON record ({line[:80]!r}); remove that line, or "
                            "start the run afresh with resume=null") from None
    return records, None


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (a half-written last line, from a crash or a run still writing,
    is left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    return _read_records(path)[0] if path.exists() else []
