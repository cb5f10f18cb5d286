"""Checks on a composed config that Hydra itself cannot make, with messages listing valid values."""
from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

from nora.errors import UserError
from nora.methods import METHODS
from nora.models import FAMILIES


def per_family(value, family: str, what: str):
    """A setting given either as one value or as ``{vision: .., causal_lm: ..}``."""
    if isinstance(value, (dict, DictConfig)):
        if family not in value:
            raise UserError(f"{what} has no value for {family} models (has: {', '.join(value)})")
        return value[family]
    return value


def validate(cfg: DictConfig) -> None:
    """Fail at once on incompatible combinations (e.g. a vision method with an LLM)."""
    m, d, meth = cfg.model, cfg.dataset, cfg.method
    if m.family not in FAMILIES:
        raise UserError(f"model.family={m.family!r}; valid: {', '.join(FAMILIES)}")
    if d.family != m.family:
        raise UserError(f"dataset={d.name} is a {d.family} dataset but model={m.name} is a {m.family} model; "
                        f"pick a {m.family} dataset or a {d.family} model")
    if meth.name not in METHODS:
        raise UserError(f"unknown method {meth.name!r}; valid: {', '.join(METHODS)}")
    if m.family not in meth.families:
        valid = [x for x in METHODS if x != "linear_probe" or m.family == "vision"]
        raise UserError(f"method={meth.name} does not apply to {m.family} models; valid: {', '.join(valid)}")
    if int(cfg.trainer.batch_size) < 1:
        raise UserError("trainer.batch_size must be >= 1")


def config_hash(cfg: DictConfig, exclude: tuple[str, ...] = ("resume", "force", "output_root", "logger",
                                                             "run_name")) -> str:
    """A short, stable hash of what determines a run's result (not where it is written or logged)."""
    d = OmegaConf.to_container(cfg, resolve=True)
    for k in exclude:
        d.pop(k, None)
    if isinstance(d.get("trainer"), dict):
        for k in ("progress", "num_workers", "log_every", "checkpoint_every", "stop_after_steps"):
            d["trainer"].pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]
