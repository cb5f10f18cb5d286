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
    if cfg.get("on_config_change", "error") not in ON_CONFIG_CHANGE:
        raise UserError(f"on_config_change={cfg.on_config_change!r}; valid: {', '.join(ON_CONFIG_CHANGE)}")


# What decides where a run is written, how it is logged or shown, or whether it is skipped or resumed: not
# its result. Changing these never makes a run directory "another configuration".
NOT_RESULT_KEYS = ("resume", "force", "on_config_change", "output_root", "logger", "run_name", "hydra")
# strategy: DDP and FSDP take the same steps (tests/test_distributed.py), and a checkpoint resumes under either
NOT_RESULT_TRAINER_KEYS = ("progress", "num_workers", "log_every", "checkpoint_every", "stop_after_steps", "strategy")
ON_CONFIG_CHANGE = ("error", "rerun", "keep")


def result_config(cfg) -> dict:
    """The resolved part of a config (DictConfig or plain dict) that determines a run's result. A job
    composed with its ``hydra`` node works too: that node (which resolves only inside a Hydra run) is
    dropped before anything is resolved."""
    d = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    d.pop("hydra", None)
    d = OmegaConf.to_container(OmegaConf.create(d), resolve=True)
    for k in NOT_RESULT_KEYS:
        d.pop(k, None)
    if isinstance(d.get("trainer"), dict):
        for k in NOT_RESULT_TRAINER_KEYS:
            d["trainer"].pop(k, None)
    return d


def config_hash(cfg) -> str:
    """A short, stable hash of what determines a run's result (not where it is written or logged)."""
    return hashlib.sha256(json.dumps(result_config(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def config_differences(before, after) -> list[str]:
    """``key: before -> after`` for every result-determining value that differs between two configs."""
    a, b = _flatten(result_config(before)), _flatten(result_config(after))
    missing = "(not set)"
    return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}".replace(f"'{missing}'", missing)
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]
