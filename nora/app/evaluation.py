"""The job ``eval.py`` runs (as :func:`nora.app.training.run_training` is ``train.py``'s): MMLU of a base model or of a
training run's model, written as ``mmlu.json`` into the run directory (or ``<output_root>/eval/<model.name>/``)."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from nora.app.reload import load_trained_model, read_run_config
from nora.errors import MissingFileError, UserError
from nora.eval.mmlu import PROTOCOLS, run_mmlu
from nora.eval.mmlu_data import GROUPINGS, SOURCES, all_subjects
from nora.hardware import resolve_device
from nora.hub import go_offline_if_unreachable
from nora.models.causal_lm import build_causal_lm
from nora.models.config import as_model_config, get_family
from nora.runs.layout import RunDir
from nora.runs.logger import log_mmlu_to_wandb
from nora.schema import at_least, load, one_of

log = logging.getLogger(__name__)


@dataclass
class MMLUSettings:
    """The ``mmlu`` group (``configs/mmlu/default.yaml``)."""

    path: str = "data/mmlu"
    source: str = "auto"  # auto | csv | hf
    subjects: Any = "available"  # available | all | a list of subjects
    k: int = 5
    grouping: str = "original"  # original | lm_eval
    protocol: str = "letters"  # letters (lm_eval mmlu) | continuation (lm_eval mmlu_continuation)
    split: str = "test"
    batch_size: int = 8
    max_length: Optional[int] = None
    bf16: bool = True
    save_predictions: bool = False
    progress: bool = True  # a progress bar per subject on stderr

    def __post_init__(self):
        one_of("source", self.source, SOURCES)
        one_of("grouping", self.grouping, GROUPINGS)
        one_of("protocol", self.protocol, PROTOCOLS)
        at_least("k", self.k, 0)
        at_least("batch_size", self.batch_size, 1)
        at_least("max_length", self.max_length, 1, allow_none=True)

    @property
    def subject_list(self):
        """What :func:`nora.eval.mmlu.run_mmlu` takes: None for all 57, ``"available"``, or a list."""
        if self.subjects in (None, "all"):
            return None
        return self.subjects if isinstance(self.subjects, str) else list(self.subjects)


@dataclass
class EvalConfig:
    """``configs/eval.yaml`` without its ``model`` group (a model schema of :mod:`nora.models.config`)."""

    run_dir: Optional[str] = None  # a training run: its config.yaml rebuilds the base model; `model` is ignored
    output_dir: Optional[str] = None  # null: <run_dir>/mmlu.json, or <output_root>/eval/<model.name>/mmlu.json
    output_root: str = "runs"
    device: str = "auto"
    dtype: Optional[str] = None
    model_path: Optional[str] = None
    mmlu: MMLUSettings = field(default_factory=MMLUSettings)


def eval_config(cfg) -> tuple[EvalConfig, Any]:
    """The typed ``eval`` config and its model section (typed too, unless a run directory names the model)."""
    d = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    d.pop("hydra", None)
    model = d.pop("model", None)
    mmlu = load(MMLUSettings, d.pop("mmlu", None) or {}, "mmlu")  # its own schema: a bad key lists mmlu's keys
    typed = dataclasses.replace(load(EvalConfig, d, ""), mmlu=mmlu)
    return typed, (as_model_config(model) if model is not None and typed.run_dir is None else None)


@dataclass
class _Target:
    """What is evaluated and where its ``mmlu.json`` goes."""

    model: Any
    tokenizer: Any
    model_cfg: Any  # the typed model config (nora.models.config)
    adapter: dict | None  # nora.app.adapters.adapter_identity of a training run's adapter; None for a base model
    out_dir: Path
    identity: dict  # mmlu.json's "model" entry


def _trained_model(cfg: EvalConfig, device) -> _Target:
    """The model ``cfg.run_dir`` trained (base model + its adapter); ``mmlu.json`` goes into the run directory."""
    run_cfg = read_run_config(cfg.run_dir)
    if not get_family(run_cfg.model.family).language_model:
        raise UserError(
            f"run_dir={cfg.run_dir} trained a {run_cfg.model.family} model ({run_cfg.model.name}); "
            "MMLU needs a causal LM run"
        )
    trained = load_trained_model(cfg.run_dir, device=device, dtype=cfg.dtype, model_path=cfg.model_path)
    identity = {
        "run_dir": str(Path(cfg.run_dir).resolve()),
        "method": run_cfg.method.name,
        "dataset": run_cfg.dataset.name,
        "seed": int(run_cfg.seed),
    }
    out_dir = Path(cfg.output_dir or cfg.run_dir)
    return _Target(trained.model, trained.tokenizer, as_model_config(run_cfg.model), trained.adapter, out_dir, identity)


def _base_model(cfg: EvalConfig, model_cfg, device) -> _Target:
    """The base model ``model_cfg``; ``mmlu.json`` goes into ``<output_root>/eval/<model.name>/``."""
    if not get_family(model_cfg.family).language_model:
        raise UserError(
            f"model={model_cfg.name} is a {model_cfg.family} model; MMLU needs a causal LM "
            "(e.g. model=llama3_8b, or run_dir=<a causal LM training run>)"
        )
    model_cfg = dataclasses.replace(
        model_cfg,
        path=cfg.model_path or model_cfg.path,
        dtype=cfg.dtype or model_cfg.dtype,
        gradient_checkpointing=False,
    )
    model, tokenizer = build_causal_lm(model_cfg)
    model = model.to(device).eval()
    model.requires_grad_(False)
    out_dir = Path(cfg.output_dir or Path(cfg.output_root) / "eval" / model_cfg.name)
    return _Target(model, tokenizer, model_cfg, None, out_dir, {"method": "base"})


def run_eval(cfg: DictConfig) -> dict:
    """Evaluate and write ``mmlu.json``; returns its dictionary."""
    cfg, model_cfg = eval_config(cfg)  # every value checked before anything is loaded
    go_offline_if_unreachable()
    device = resolve_device(cfg.device, "device")
    t = _trained_model(cfg, device) if cfg.run_dir else _base_model(cfg, model_cfg, device)
    t.identity.update(
        {
            "name": t.model_cfg.name,
            "hf_name": t.model_cfg.hf_name,
            "path": t.model_cfg.path,
            "dtype": str(next(t.model.parameters()).dtype).replace("torch.", ""),
            "device": str(device),
        }
    )
    m = cfg.mmlu
    try:
        result = run_mmlu(
            t.model,
            t.tokenizer,
            m.path,
            t.out_dir,
            source=m.source,
            subjects=m.subject_list,
            k=m.k,
            grouping=m.grouping,
            batch_size=m.batch_size,
            max_length=m.max_length,
            bf16=m.bf16,
            split=m.split,
            model_identity=t.identity,
            adapter_identity=t.adapter,
            include_predictions=m.save_predictions,
            protocol=m.protocol,
            progress=m.progress,
        )
    except FileNotFoundError as exc:
        raise MissingFileError(str(exc)) from None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    n, n_all = len(result.subjects), len(all_subjects(m.path if Path(m.path).expanduser().is_dir() else None))
    if n < n_all:
        warnings.warn(
            f"MMLU: evaluated {n} of {n_all} subjects (mmlu.subjects={m.subjects}); the averages cover only those",
            stacklevel=1,
        )
    d = result.to_dict()
    log.info(f"MMLU {m.k}-shot ({m.protocol}) on {n} subjects ({result.n} questions): {100 * result.accuracy:.2f}%")
    for cat, v in d["categories"].items():
        acc = "n/a" if v["accuracy"] is None else f"{100 * v['accuracy']:.2f}%"
        log.info(f"  {cat:16s} {acc:>8s}  ({v['n']} questions)")
    log.info(f"wrote {RunDir(t.out_dir).mmlu}")
    if cfg.run_dir:  # into the training run's W&B run, when it logged to one
        log_mmlu_to_wandb(cfg.run_dir, d)
    return d


__all__ = ["run_eval"]
