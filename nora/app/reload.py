"""Reload what a training run produced: the base model rebuilt from ``<run_dir>/config.yaml`` plus the run's adapter.

::

    from nora.app.reload import load_trained_model
    trained = load_trained_model("runs/llama3_8b_alpaca_nora_pp_s0", device="cuda")
    trained.model, trained.tokenizer, trained.config, trained.adapter

The adapter directory and its kinds: :mod:`nora.app.adapters`. The base model is built exactly as for training
(same model config; a random-initialised test model from its seed), so the returned model computes what the
trained one did.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from nora.app.adapters import apply_adapter, check_adapter
from nora.errors import UserError
from nora.hardware import seed_everything
from nora.models import build_model
from nora.models.causal_lm import build_causal_lm, resolve_dtype
from nora.models.config import as_model_config, get_family
from nora.runs.identity import edited_config
from nora.runs.layout import RunDir, read_summary


@dataclass
class TrainedModel:
    model: nn.Module  # base model + adapter, frozen, in eval mode
    tokenizer: Any | None  # causal LMs: the tokenizer the run used; vision: None
    config: DictConfig  # the run's resolved config
    adapter: dict = field(default_factory=dict)  # {"dir", "kind", "components", "files"}
    summary: dict | None = None  # the run's summary.json, if any


def read_run_config(run_dir: str | os.PathLike) -> DictConfig:
    """The run's ``config.yaml``, after checking it is the config the run trained with (its ``config_hash``
    against ``summary.json``'s): an edited file is a :class:`UserError` naming it and the keys that differ."""
    path = RunDir(run_dir).config
    if not path.exists():
        raise UserError(f"{run_dir}: no config.yaml; pass the directory of a training run (runs/<run_name>)")
    why = edited_config(run_dir)
    if why is not None:
        where = RunDir(run_dir).hydra_config
        hint = f" ({where} holds the config train.py started it with)" if where.is_file() else ""
        raise UserError(f"{why}; restore the file{hint} or retrain the run (force=true)")
    return OmegaConf.load(path)


def build_base_model(cfg: DictConfig, model_path: str | None = None):
    """``(model, tokenizer)`` as the run built it before applying its method (tokenizer None for vision).
    ``model_path`` points a causal LM at a local copy of its weights (overrides ``model.path``)."""
    mcfg = as_model_config(cfg.model)  # the run's model section, through the same schema as at training time
    if get_family(mcfg.family).language_model:
        path = str(model_path) if model_path is not None else mcfg.path
        return build_causal_lm(dataclasses.replace(mcfg, path=path, gradient_checkpointing=False))
    # as run_training: seeded, so a randomly initialised backbone (test models) is the one that was trained
    with torch.random.fork_rng(devices=[]):
        seed_everything(int(cfg.seed))
        return build_model(mcfg, int(cfg.dataset.num_classes)), None


def load_trained_model(
    run_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    model_path: str | None = None,
) -> TrainedModel:
    """The model a run trained: base model from ``<run_dir>/config.yaml`` + ``<run_dir>/adapter/``.

    ``device``: where to put it (default: stays on the CPU). ``dtype``: cast the base weights (e.g.
    ``torch.bfloat16``; NoRA coefficients stay float32). ``model_path``: a local copy of a causal LM's weights
    when the run's ``model.path``/hub id is not available here."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    adir = RunDir(run_dir).adapter
    if not adir.is_dir():
        raise UserError(
            f"{run_dir}: no adapter/ directory (is the run complete? its summary.json says {_status(run_dir)})"
        )
    summary = read_summary(run_dir)
    check_adapter(adir, cfg.method, (summary or {}).get("adapter"))  # the run's own adapter, before any loading
    model, tokenizer = build_base_model(cfg, model_path)
    if dtype is not None:
        model = model.to(resolve_dtype(dtype))
    model, identity = apply_adapter(model, adir)
    if device is not None:
        model = model.to(device)
    return TrainedModel(model, tokenizer, cfg, identity, summary)


def _status(run_dir: Path) -> str:
    if not RunDir(run_dir).summary.exists():
        return "nothing (no summary.json)"
    summary = read_summary(run_dir)
    return str(summary.get("status")) if summary is not None else "nothing readable"
