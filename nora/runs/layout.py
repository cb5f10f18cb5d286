"""The layout of a run directory, in one place: every module that writes, reloads or collects runs uses it.

=====================  =========================================================================
config.yaml            the resolved config the run was (last) started with
metrics.jsonl          step/epoch loss, lr, throughput, data-wait share; eval metrics
summary.json           status, method, model, dataset, seed, parameters, final/best metrics, timing
adapter/               what the method trained (peft files, NoRA files, or trainable.safetensors)
activations.png        learned activation curves per layer vs the original (rational methods)
mmlu.json              MMLU of the trained model (``eval.py run_dir=...``)
checkpoints/last.pt    the latest checkpoint (atomic), used by ``resume``
wandb/                 the W&B run files (offline by default)
.lock                  held by the process training into the directory (:mod:`nora.runs.lock`)
=====================  =========================================================================

``write_*`` functions write atomically (:mod:`nora.files`); ``read_*`` functions return None for a missing or
unreadable file instead of raising.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from nora.eval.mmlu import MMLU_FILE
from nora.files import read_json, remove_stale_temps, write_json_atomic, write_text_atomic
from nora.schema import escape_interpolations

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
ADAPTER = "adapter"
ACTIVATIONS = "activations.png"
MMLU = MMLU_FILE
CHECKPOINTS = "checkpoints"
CHECKPOINT = "last.pt"
WANDB = "wandb"
LOCK = ".lock"
HYDRA_CONFIG = ".hydra/config.yaml"  # the config as composed (unresolved), written when train.py starts the run


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (nothing is created by building one)."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER

    @property
    def activations(self) -> Path:
        return self.root / ACTIVATIONS

    @property
    def mmlu(self) -> Path:
        return self.root / MMLU

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def checkpoint(self) -> Path:
        return self.checkpoints / CHECKPOINT

    @property
    def wandb(self) -> Path:
        return self.root / WANDB

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def hydra_config(self) -> Path:
        return self.root / HYDRA_CONFIG

    def outputs(self) -> list[Path]:
        """Everything a run produces (what a fresh start in this directory must remove first)."""
        return [self.config, self.metrics, self.summary, self.adapter, self.activations, self.mmlu, self.checkpoints]

    def clear_outputs(self) -> None:
        """Remove every output of an earlier run (a fresh start: nothing of it may be reported or reloaded as
        this run's, e.g. a NoRA adapter file left in ``adapter/`` by an earlier ``nora_pp`` run of the directory).
        The W&B files stay: W&B keeps its own history of the run id."""
        for path in self.outputs():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def remove_stale_temps(self) -> list[Path]:
        """The temp files interrupted writes left here (``.last.pt.<random>.tmp``, ``.metrics.jsonl.<random>.tmp``,
        ...), removed; for the process holding the run's lock. ``eval.py`` writes ``mmlu.json`` without the lock: its
        temp files are removed only once an hour old."""
        removed = []
        for d in (self.root, self.checkpoints, self.adapter, self.root / ".hydra"):
            removed += remove_stale_temps(d, spare=lambda target: target == MMLU)
        return removed + remove_stale_temps(self.root, min_age_s=3600, spare=lambda target: target != MMLU)

    def __fspath__(self) -> str:
        return str(self.root)


def run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a run directory's name under ``output_root`` (one directory name: no ``/``, not
    ``.`` or ``..``, not empty: ``run_name=../x`` would write outside ``output_root``), or None."""
    if not name.strip() or name in (".", "..") or "/" in name or "\0" in name:
        return (
            f"run_name={name!r}: must be one directory name under output_root (not empty, '.' or '..', no '/'); "
            "put runs in another folder with output_root"
        )
    return None


def read_summary(run_dir: str | os.PathLike) -> dict | None:
    """The run's ``summary.json`` or None (missing, or not readable JSON)."""
    s = read_json(RunDir(run_dir).summary)
    return s if isinstance(s, dict) else None


def is_complete(run_dir: str | os.PathLike) -> bool:
    s = read_summary(run_dir)
    return bool(s and s.get("status") == "complete")


def write_summary(run_dir: str | os.PathLike, summary: dict) -> None:
    write_json_atomic(RunDir(run_dir).summary, summary)


def read_stored_config(run_dir: str | os.PathLike) -> dict | None:
    """The config a run directory was last started with (its ``config.yaml``) as a dict, or None. Values are
    resolved, as stored: a value that holds interpolation syntax keeps its escape (``\\${oc.env:V}``), so that
    ``OmegaConf.create`` of the dict reads it back as written (:func:`escape_interpolations`)."""
    path = RunDir(run_dir).config
    return OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else None


def config_yaml(cfg) -> str:
    """``cfg`` (a DictConfig or dict) resolved, as ``config.yaml`` stores it: values escaped
    (:func:`escape_interpolations`), without the ``hydra`` node."""
    d = OmegaConf.to_container(cfg, resolve=False) if not isinstance(cfg, dict) else dict(cfg)
    d.pop("hydra", None)  # resolves only inside a Hydra run
    resolved = OmegaConf.to_container(OmegaConf.create(d), resolve=True)
    return OmegaConf.to_yaml(OmegaConf.create(escape_interpolations(resolved)))


def write_config(run_dir: str | os.PathLike, cfg) -> None:
    """Write ``config.yaml``: ``cfg`` resolved and escaped (:func:`config_yaml`)."""
    write_text_atomic(RunDir(run_dir).config, config_yaml(cfg))


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """Where a run directory keeps the checkpoint it resumes from."""
    return RunDir(run_dir).checkpoint
