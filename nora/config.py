"""A composed ``train`` config as a typed, checked :class:`RunConfig` (:func:`validate`), and what identifies a
run's result (:func:`result_config`, :func:`config_hash`, :func:`config_differences`).

Each section has its schema next to the code that reads it: ``trainer`` -> :class:`nora.train.config.TrainerConfig`,
``method`` -> :class:`nora.methods.config.MethodConfig`, ``model`` -> :mod:`nora.models.config`, ``dataset`` ->
:mod:`nora.data.schema`. The run directory's ``config.yaml`` and hash stay those of the composed config."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from nora.data.schema import check_dataset
from nora.errors import UserError
from nora.methods import METHODS, methods_for
from nora.methods.config import MethodConfig, nora_groups_message
from nora.models import FAMILIES
from nora.models.config import ModelConfig, as_model_config
from nora.schema import at_least, load, one_of
from nora.train.config import TrainerConfig


def per_family(value, family: str, what: str):
    """A setting given either as one value or as ``{vision: .., causal_lm: ..}``."""
    if isinstance(value, (dict, DictConfig)):
        if family not in value:
            raise UserError(f"{what} has no value for {family} models (has: {', '.join(value)})")
        return value[family]
    return value


ON_CONFIG_CHANGE = ("error", "rerun", "keep")


@dataclass
class RunSettings:
    """The top-level keys of ``configs/train.yaml`` (``output_root``, ``run_name``, ``data`` and ``logger`` are read
    where they are used: Hydra, the run directory, interpolations, :class:`nora.train.logger.RunLogger`)."""

    seed: int = 0
    resume: Any = "auto"        # auto | null/false | a run directory or checkpoint
    force: bool = False
    on_config_change: str = "error"

    def __post_init__(self):
        at_least("seed", self.seed, 0)
        one_of("on_config_change", self.on_config_change, ON_CONFIG_CHANGE)


@dataclass
class RunConfig:
    """The typed, checked view of a composed ``train`` config: what ``run_training`` and the setups read.
    (``logger`` stays the composed section: :class:`nora.train.logger.RunLogger` reads it.)"""

    model: ModelConfig
    dataset: Any              # a vision schema of nora.data.schema, or nora.data.instruct.InstructDataConfig
    method: MethodConfig
    trainer: TrainerConfig
    seed: int
    run_name: str
    resume: Any               # auto | null/false | a run directory or checkpoint
    force: bool
    on_config_change: str
    lr: float                 # the learning rates and weight decay in force: trainer.* or the method's default
    head_lr: Optional[float]
    nora_lr: Optional[float]
    weight_decay: float

    @property
    def family(self) -> str:
        return self.model.family


def validate(cfg: DictConfig) -> RunConfig:
    """Every check a composed config allows before any model or data is loaded: compatible groups (e.g. a
    vision method with an LLM), then each section's types, ranges and choices (its schema). Returns the
    typed config; a bad value raises a one-line :class:`UserError` naming the key."""
    _check_groups(cfg)
    d = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    d.pop("hydra", None)
    c = OmegaConf.create(d)
    method = load(MethodConfig, _resolved(c, "method"), "method")
    model = as_model_config(_resolved(c, "model"))
    trainer = load(TrainerConfig, _resolved(c, "trainer"), "trainer")
    dataset = check_dataset(c.dataset, model.family)
    top = load(RunSettings, {f.name: c[f.name] for f in fields(RunSettings) if f.name in c}, "")
    _check_groups_divide_width(method, model)
    lr, head_lr, nora_lr = (_learning_rate(trainer, method, key, model.family) for key in ("lr", "head_lr", "nora_lr"))
    if lr is None:
        raise UserError(f"method={method.name} has no lr for {model.family} models; set trainer.lr")
    wd = trainer.weight_decay if trainer.weight_decay is not None else method.weight_decay
    return RunConfig(model=model, dataset=dataset, method=method, trainer=trainer, seed=top.seed,
                     run_name=str(c.run_name), resume=top.resume, force=top.force,
                     on_config_change=top.on_config_change, lr=lr, head_lr=head_lr, nora_lr=nora_lr,
                     weight_decay=float(wd))


def _learning_rate(trainer: TrainerConfig, method: MethodConfig, key: str, family: str) -> Optional[float]:
    """``trainer.<key>`` if set, else the method's default for the model family (None: same as ``lr``)."""
    value = getattr(trainer, key)
    if value is None:
        value = per_family(getattr(method, key), family, f"method.{key}")
    return None if value is None else float(value)


def _check_groups(cfg) -> None:
    m, d, meth = cfg.model, cfg.dataset, cfg.method
    if m.family not in FAMILIES:
        raise UserError(f"model.family={m.family!r}; valid: {', '.join(FAMILIES)}")
    if d.family != m.family:
        raise UserError(f"dataset={d.name} is a {d.family} dataset but model={m.name} is a {m.family} model; "
                        f"pick a {m.family} dataset or a {d.family} model")
    if meth.name not in METHODS:
        raise UserError(f"unknown method {meth.name!r}; valid: {', '.join(METHODS)}")
    if m.family not in meth.families:
        raise UserError(f"method={meth.name} does not apply to {m.family} models; valid: "
                        f"{', '.join(methods_for(m.family))}")


def _check_groups_divide_width(method: MethodConfig, model: ModelConfig) -> None:
    """NoRA splits the activation's channels into ``groups``; where the model config tells the width, a groups
    value that does not divide it fails here (otherwise at injection, with the same message)."""
    width = model.mlp_width()
    if method.nora is not None and width is not None and width % method.nora.groups:
        raise UserError(nora_groups_message(method.nora.groups, width, f"model={model.name}"))


def _resolved(c: DictConfig, key: str) -> dict:
    return OmegaConf.to_container(c[key], resolve=True)


# What decides where a run is written, how it is logged or shown, or whether it is skipped or resumed: not
# its result. Changing these never makes a run directory "another configuration".
NOT_RESULT_KEYS = ("resume", "force", "on_config_change", "output_root", "logger", "run_name", "hydra")
# strategy: DDP and FSDP take the same steps (tests/test_distributed.py), and a checkpoint resumes under either
NOT_RESULT_TRAINER_KEYS = ("progress", "num_workers", "log_every", "checkpoint_every", "stop_after_steps", "strategy")


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
