"""Metrics to ``metrics.jsonl`` in the run directory and, with the same keys, to Weights & Biases."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path


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
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)

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

