"""The job ``eval.py`` runs (as :func:`nora.app.training.run_training` is ``train.py``'s): MMLU of a base model or of a
training run's model, written as ``mmlu.json`` into the run directory (or ``<output_root>/eval/<model.name>/``)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from nora.app.reload import load_trained_model, read_run_config
from nora.errors import MissingFileError, UserError
from nora.eval.mmlu import run_mmlu
from nora.eval.mmlu_data import all_subjects
from nora.hardware import resolve_device
from nora.hub import go_offline_if_unreachable
from nora.models.causal_lm import build_causal_lm
from nora.runs.layout import RunDir
from nora.runs.logger import log_mmlu_to_wandb

def _subjects(value):
    if value in (None, "all"):
        return None
    if isinstance(value, str):
        return value
    return list(value)


@dataclass
class _Target:
    """What is evaluated and where its ``mmlu.json`` goes."""

    model: Any
    tokenizer: Any
    model_cfg: DictConfig
    adapter: dict | None   # nora.runs.adapter_identity of a training run's adapter; None for a base model
    out_dir: Path
    identity: dict         # mmlu.json's "model" entry


def _trained_model(cfg: DictConfig, device) -> _Target:
    """The model ``cfg.run_dir`` trained (base model + its adapter); ``mmlu.json`` goes into the run directory."""
    run_cfg = read_run_config(cfg.run_dir)
    if run_cfg.model.family != "causal_lm":
        raise UserError(f"run_dir={cfg.run_dir} trained a {run_cfg.model.family} model ({run_cfg.model.name}); "
                        "MMLU needs a causal LM run")
    trained = load_trained_model(cfg.run_dir, device=device, dtype=cfg.dtype, model_path=cfg.model_path)
    identity = {"run_dir": str(Path(cfg.run_dir).resolve()), "method": run_cfg.method.name,
                "dataset": run_cfg.dataset.name, "seed": int(run_cfg.seed)}
    out_dir = Path(cfg.output_dir or cfg.run_dir)
    return _Target(trained.model, trained.tokenizer, run_cfg.model, trained.adapter, out_dir, identity)


def _base_model(cfg: DictConfig, device) -> _Target:
    """The base model ``cfg.model``; ``mmlu.json`` goes into ``<output_root>/eval/<model.name>/``."""
    if cfg.model.family != "causal_lm":
        raise UserError(f"model={cfg.model.name} is a {cfg.model.family} model; MMLU needs a causal LM "
                        "(e.g. model=llama3_8b, or run_dir=<a causal LM training run>)")
    model_cfg = cfg.model.copy()
    if cfg.model_path:
        model_cfg.path = cfg.model_path
    if cfg.dtype:
        model_cfg.dtype = cfg.dtype
    model_cfg.gradient_checkpointing = False
    model, tokenizer = build_causal_lm(model_cfg)
    model = model.to(device).eval()
    model.requires_grad_(False)
    out_dir = Path(cfg.output_dir or Path(cfg.output_root) / "eval" / cfg.model.name)
    return _Target(model, tokenizer, model_cfg, None, out_dir, {"method": "base"})


def run_eval(cfg: DictConfig) -> dict:
    """Evaluate and write ``mmlu.json``; returns its dictionary."""

    go_offline_if_unreachable()
    device = resolve_device(cfg.device)
    t = (_trained_model if cfg.run_dir else _base_model)(cfg, device)
    t.identity.update({"name": t.model_cfg.name, "hf_name": t.model_cfg.get("hf_name"),
                       "path": t.model_cfg.get("path"),
                       "dtype": str(next(t.model.parameters()).dtype).replace("torch.", ""), "device": str(device)})
    m = cfg.mmlu
    try:
        result = run_mmlu(t.model, t.tokenizer, m.path, t.out_dir, source=m.source, subjects=_subjects(m.subjects),
                          k=int(m.k), grouping=m.grouping, batch_size=int(m.batch_size), max_length=m.max_length,
                          bf16=bool(m.bf16), split=m.split, model_identity=t.identity, adapter_identity=t.adapter,
                          include_predictions=bool(m.save_predictions))
    except FileNotFoundError as exc:
        raise MissingFileError(str(exc)) from None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    n, n_all = len(result.subjects), len(all_subjects())
    if n < n_all:
        warnings.warn(f"MMLU: evaluated {n} of {n_all} subjects (mmlu.subjects={m.subjects}); the averages cover "
                      "only those", stacklevel=1)
    d = result.to_dict()
    print(f"MMLU {m.k}-shot on {n} subjects ({result.n} questions): {100 * result.accuracy:.2f}%")
    for cat, v in d["categories"].items():
        acc = "n/a" if v["accuracy"] is None else f"{100 * v['accuracy']:.2f}%"
        print(f"  {cat:16s} {acc:>8s}  ({v['n']} questions)")
    print(f"wrote {RunDir(t.out_dir).mmlu}")
    if cfg.run_dir:  # into the training run's W&B run, when it logged to one

        log_mmlu_to_wandb(cfg.run_dir, d)
    return d


__all__ = ["run_eval"]
