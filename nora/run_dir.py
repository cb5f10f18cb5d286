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
=====================  =========================================================================

``write_*`` functions write atomically (:mod:`nora.files`); ``read_*`` functions return None for a missing or
unreadable file instead of raising.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nora.files import read_json, write_json_atomic, write_text_atomic

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
ADAPTER = "adapter"
ACTIVATIONS = "activations.png"
MMLU = "mmlu.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT = "last.pt"
WANDB = "wandb"


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

    def outputs(self) -> list[Path]:
        """Everything a run produces (what a fresh start in this directory must remove first)."""
        return [self.config, self.metrics, self.summary, self.adapter, self.activations, self.mmlu, self.checkpoints]

    def __fspath__(self) -> str:
        return str(self.root)


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
    """The resolved config a run directory was last started with (its ``config.yaml``) as a dict, or None."""
    from omegaconf import OmegaConf

    path = RunDir(run_dir).config
    return OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else None


def write_config(run_dir: str | os.PathLike, config_yaml: str) -> None:
    write_text_atomic(RunDir(run_dir).config, config_yaml)


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """Where a run directory keeps the checkpoint it resumes from."""
    return RunDir(run_dir).checkpoint
