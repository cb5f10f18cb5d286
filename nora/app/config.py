"""A composed ``train`` config as a typed, checked :class:`RunConfig` (:func:`validate`), and the config files
themselves (:data:`CONFIG_DIR`, :func:`compose`).

Each section has its schema next to the code that reads it: ``trainer`` -> :class:`nora.train.config.TrainerConfig`,
``method`` -> :class:`nora.methods.config.MethodConfig`, ``model`` -> :mod:`nora.models.config`, ``dataset`` ->
:mod:`nora.data.config`, ``logger`` -> :class:`nora.runs.logger.LoggerConfig`. The composed ``DictConfig`` is kept
only to write the run directory's ``config.yaml`` and to identify the run (:mod:`nora.runs.identity`)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from nora.adapter.engine import GroupsError, check_groups
from nora.data.config import check_dataset
from nora.errors import UserError
from nora.methods import method_for
from nora.methods.config import MethodConfig, NoraSettings
from nora.models.config import ModelConfig, as_model_config, get_family
from nora.runs import naming  # noqa: F401  registers ${run_overrides:}, which configs/train.yaml's run_name uses
from nora.runs.layout import run_name_problem
from nora.runs.logger import LoggerConfig, credentials_problem
from nora.schema import defaults, load, one_of, per_family, require
from nora.train.config import TrainerConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

# NoRA's defaults live in nora.NoraConfig alone (NoraSettings adds two run fields): configs/adapter/nora.yaml starts
# from this node (its defaults list) and sets only what other groups give by interpolation. Left out of the node:
# trainable_modules (a run's new head comes from the model config) and agreement_prompts (its schema default
# applies; a key added to every composed config would change the identity, config_hash, of every earlier run).
NORA_NOT_IN_CONFIG = ("trainable_modules", "agreement_prompts")
ConfigStore.instance().store(
    group="adapter", name="nora_defaults", node=defaults(NoraSettings, exclude=NORA_NOT_IN_CONFIG)
)


def compose(overrides: list[str], config_name: str = "train", return_hydra_config: bool = False) -> DictConfig:
    """``configs/<config_name>.yaml`` composed with ``overrides``, as ``train.py`` would (outside a Hydra run)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides, return_hydra_config=return_hydra_config)


ON_CONFIG_CHANGE = ("error", "rerun", "keep")


@dataclass
class RunSettings:
    """The top-level keys of ``configs/train.yaml`` (``output_root``, ``run_name`` and ``data`` are read where they
    are used: Hydra, the run directory, interpolations)."""

    seed: int = 0
    resume: Any = "auto"  # auto | null/false | a run directory or checkpoint
    force: bool = False
    on_config_change: str = "error"

    def __post_init__(self):
        require(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2**32) (numpy's seed range)")
        one_of("on_config_change", self.on_config_change, ON_CONFIG_CHANGE)


@dataclass
class RunConfig:
    """The typed, checked view of a composed ``train`` config: what ``run_training``, the setups, the trainer and
    the logger read. ``trainer`` holds the learning rates and weight decay in force (``trainer.*`` or the
    method's default for the model family)."""

    model: ModelConfig
    dataset: Any  # a vision schema of nora.data.config, or nora.data.instruct.InstructDataConfig
    method: MethodConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    seed: int
    run_name: str
    resume: Any  # auto | null/false | a run directory or checkpoint
    force: bool
    on_config_change: str
    composed: Any = None  # the composed DictConfig itself: written as config.yaml, hashed (nora.runs.identity)

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
    method_for(method, model.family)  # the registered method: its families, the blocks it reads, its settings
    trainer = load(TrainerConfig, _resolved(c, "trainer"), "trainer")
    dataset = check_dataset(c.dataset, model.family)
    top = load(RunSettings, {f.name: c[f.name] for f in fields(RunSettings) if f.name in c}, "")
    _check_groups_divide_width(method, model)
    lr, head_lr, nora_lr = (_learning_rate(trainer, method, key, model.family) for key in ("lr", "head_lr", "nora_lr"))
    if lr is None:
        raise UserError(f"method={method.name} has no lr for {model.family} models; set trainer.lr")
    wd = trainer.weight_decay if trainer.weight_decay is not None else method.weight_decay
    trainer = dataclasses.replace(trainer, lr=lr, head_lr=head_lr, nora_lr=nora_lr, weight_decay=float(wd))
    logger = load(LoggerConfig, _resolved(c, "logger") if "logger" in c else {}, "logger")
    why = credentials_problem(logger)
    if why is not None:
        raise UserError(why)
    limit = getattr(dataset, "limit_train", None)
    if limit is not None and limit < trainer.batch_size:
        raise UserError(
            f"dataset.limit_train={limit} is fewer than one batch (trainer.batch_size="
            f"{trainer.batch_size}): no training step; raise it or lower trainer.batch_size"
        )
    why = run_name_problem(str(c.run_name))
    if why is not None:
        raise UserError(why)
    return RunConfig(
        model=model,
        dataset=dataset,
        method=method,
        trainer=trainer,
        logger=logger,
        seed=top.seed,
        run_name=str(c.run_name),
        resume=top.resume,
        force=top.force,
        on_config_change=top.on_config_change,
        composed=cfg,
    )


class ValidatedBeforeWriting(Callback):
    """A Hydra callback (``hydra.callbacks`` in configs/train.yaml): the composed config is checked (:func:`validate`)
    before Hydra creates the run directory and opens its ``train.log`` there, so a bad value (``trainer.lr=abc``)
    is one line, exit status 2, and nothing is touched. Other failures are left to ``run_training``, which
    validates again and reports them as before."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            validate(config)
        except UserError as exc:  # SystemExit, not an exception: Hydra prints those with a stack trace
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(exc.exit_code)
        except Exception:  # noqa: BLE001  reported by run_training's own validate, with its usual handling
            pass


def _learning_rate(trainer: TrainerConfig, method: MethodConfig, key: str, family: str) -> Optional[float]:
    """``trainer.<key>`` if set, else the method's default for the model family (None: same as ``lr``)."""
    value = getattr(trainer, key)
    if value is None:
        value = per_family(getattr(method, key), family, f"method.{key}")
    return None if value is None else float(value)


def _check_groups(cfg) -> None:
    m, d = cfg.model, cfg.dataset
    get_family(m.family)  # a registered family, or the one-line error listing them
    if d.family != m.family:
        raise UserError(
            f"dataset={d.name} is a {d.family} dataset but model={m.name} is a {m.family} model; "
            f"pick a {m.family} dataset or a {d.family} model"
        )


def _check_groups_divide_width(method: MethodConfig, model: ModelConfig) -> None:
    """NoRA splits the activation's channels into ``groups``; where the model config tells the width, a groups
    value that does not divide it fails here (otherwise at injection, with the same message)."""
    if method.nora is not None:
        try:
            check_groups(method.nora.groups, model.mlp_width(), f"model={model.name}")
        except GroupsError as exc:  # the injection engine's one check, named by its config key
            raise UserError(f"method.nora.{exc}") from None


def _resolved(c: DictConfig, key: str) -> dict:
    return OmegaConf.to_container(c[key], resolve=True)
