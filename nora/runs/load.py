"""Reload what a training run produced: the base model rebuilt from ``<run_dir>/config.yaml`` plus the run's adapter.

::

    from nora.runs import load_trained_model
    trained = load_trained_model("runs/llama3_8b_alpaca_nora_pp_s0", device="cuda")
    trained.model, trained.tokenizer, trained.config, trained.adapter

``<run_dir>/adapter/`` holds what the method trained (see :mod:`nora.run`): peft files (``adapter_config.json``,
``adapter_model.safetensors``: LoRA, DoRA, and a vision head through ``modules_to_save``), NoRA files
(``nora_config.json``, ``nora_adapter.safetensors``: the rational activations, and a vision head when no peft
adapter is present), both (NoRA++: its ``adapter_config.json`` is marked so that peft's loader alone refuses it,
see :mod:`nora.adapter.io`), or ``trainable.safetensors`` (full fine-tuning, linear probe: every trained tensor by
parameter name). :func:`resolve_adapter` also takes a Hub id written by :func:`nora.push_to_hub`. The base model
is built exactly as for training (same model config; a random-initialised test model from its ``init_seed``), so
the returned model computes what the trained one did.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from nora.errors import MissingFileError, UserError
from nora.runs.layout import RunDir, read_summary

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
NORA_FILES = ("nora_config.json", "nora_adapter.safetensors")
FULL_FILE = "trainable.safetensors"


@dataclass
class TrainedModel:
    model: nn.Module                 # base model + adapter, frozen, in eval mode
    tokenizer: Any | None            # causal LMs: the tokenizer the run used; vision: None
    config: DictConfig               # the run's resolved config
    adapter: dict = field(default_factory=dict)  # {"dir", "kind", "components", "files"}
    summary: dict | None = None      # the run's summary.json, if any


def read_run_config(run_dir: str | os.PathLike) -> DictConfig:
    path = RunDir(run_dir).config
    if not path.exists():
        raise UserError(f"{run_dir}: no config.yaml; pass the directory of a training run (runs/<run_name>)")
    return OmegaConf.load(path)


def build_base_model(cfg: DictConfig, model_path: str | None = None):
    """``(model, tokenizer)`` as the run built it before applying its method (tokenizer None for vision).
    ``model_path`` points a causal LM at a local copy of its weights (overrides ``model.path``)."""
    mcfg = cfg.model.copy()
    if mcfg.family == "causal_lm":
        from nora.models.causal_lm import build_causal_lm

        if model_path is not None:
            mcfg.path = str(model_path)
        mcfg.gradient_checkpointing = False
        return build_causal_lm(mcfg)
    from nora.models import build_model
    from nora.run import seed_everything

    # as run_training: seeded, so a randomly initialised backbone (test models) is the one that was trained
    with torch.random.fork_rng(devices=[]):
        seed_everything(int(cfg.seed))
        return build_model(mcfg, int(cfg.dataset.num_classes)), None


def find_adapter_dir(path: str | os.PathLike) -> Path:
    """The directory holding a run's adapter files: ``path/adapter`` if it has them, else ``path``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise MissingFileError(f"adapter or run directory not found: {p}")
    for cand in (RunDir(p).adapter, p):
        if cand.is_dir() and any((cand / f).exists() for f in (PEFT_FILES[0], NORA_FILES[0], FULL_FILE)):
            return cand
    raise MissingFileError(
        f"no adapter found in {p} or {p / 'adapter'}: expected peft files ({', '.join(PEFT_FILES)}) and/or NoRA "
        f"files ({', '.join(NORA_FILES)}) or {FULL_FILE}, as a training run saves them in <run_dir>/adapter/")


def resolve_adapter(source: str | os.PathLike, revision: str | None = None) -> Path:
    """The adapter directory of ``source``: a local run or adapter directory (see :func:`find_adapter_dir`), else
    a Hub repository id (``owner/name``, as :func:`nora.push_to_hub` writes it), downloaded once."""
    from nora.hub import HUB_ID, download_adapter

    if Path(source).expanduser().exists() or not HUB_ID.match(str(source)):
        return find_adapter_dir(source)
    return find_adapter_dir(download_adapter(str(source), revision=revision))


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def adapter_identity(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """What an adapter directory holds, JSON-able::

        {"dir", "kind": "lora" | "dora" | "<peft type>" | "nora" | "nora++" | "trainable",
         "components": [...], "peft": {peft_type, use_dora, r, lora_alpha, target_modules, config} | None,
         "nora": {variant, config, layers} | None, "files": {name: sha256}}
    """
    import nora

    adir = Path(adapter_dir)
    has_peft, has_nora = (adir / PEFT_FILES[0]).exists(), (adir / NORA_FILES[0]).exists()
    for present, files in ((has_peft, PEFT_FILES), (has_nora, NORA_FILES)):
        missing = [f for f in files if present and not (adir / f).exists()]
        if missing:
            raise MissingFileError(f"incomplete adapter in {adir}: {', '.join(missing)} missing next to {files[0]}")
    ident: dict[str, Any] = {"dir": str(adir.resolve()), "components": [], "peft": None, "nora": None, "files": {}}
    if has_peft:
        pcfg = nora.read_peft_config(adir)  # a NoRA++ marker undone: the real peft_type
        ident["components"].append("dora" if pcfg.get("use_dora") else str(pcfg.get("peft_type", "peft")).lower())
        ident["peft"] = {"peft_type": pcfg.get("peft_type"), "use_dora": bool(pcfg.get("use_dora", False)),
                         "r": pcfg.get("r"), "lora_alpha": pcfg.get("lora_alpha"),
                         "target_modules": pcfg.get("target_modules"), "config": pcfg}
    if has_nora:
        meta = nora.read_nora_config(adir)
        ident["components"].append("nora")
        ident["nora"] = {"variant": meta.get("config", {}).get("variant"), "config": meta.get("config"),
                         "layers": len(meta.get("layers", {}))}
    if not has_peft and not has_nora:
        if not (adir / FULL_FILE).exists():
            raise MissingFileError(f"no adapter in {adir}: expected peft files ({', '.join(PEFT_FILES)}), NoRA files "
                                   f"({', '.join(NORA_FILES)}) or {FULL_FILE}, as a completed training run writes them")
        ident["components"].append("trainable")
    ident["kind"] = "nora++" if has_peft and has_nora else ident["components"][0]
    for f in (*PEFT_FILES, *NORA_FILES, FULL_FILE):
        if (adir / f).exists():
            ident["files"][f] = _sha256(adir / f)
    return ident


def apply_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load the adapter files in ``adapter_dir`` onto a fresh base ``model``; returns ``(model, identity)``
    with the model frozen and in eval mode (see :func:`adapter_identity`)."""
    import nora

    adir = Path(adapter_dir)
    ident = adapter_identity(adir)
    kind = ident["kind"]
    if kind == "nora++":
        model = nora.load_nora_pp(model, adir)
    elif ident["peft"] is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adir), is_trainable=False)
    elif kind == "nora":
        model = nora.load_nora(model, adir)
    else:
        from safetensors.torch import load_file

        state = load_file(str(adir / FULL_FILE))
        own = dict(model.named_parameters())
        unknown = [k for k in state if k not in own]
        if unknown:
            raise UserError(f"{adir / FULL_FILE} holds tensors this model does not have: {unknown[:4]}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)
    model.requires_grad_(False)
    model.eval()
    return model, ident


def load_trained_model(run_dir: str | os.PathLike, *, device: str | torch.device | None = None,
                       dtype: torch.dtype | str | None = None, model_path: str | None = None) -> TrainedModel:
    """The model a run trained: base model from ``<run_dir>/config.yaml`` + ``<run_dir>/adapter/``.

    ``device``: where to put it (default: stays on the CPU). ``dtype``: cast the base weights (e.g.
    ``torch.bfloat16``; NoRA coefficients stay float32). ``model_path``: a local copy of a causal LM's weights
    when the run's ``model.path``/hub id is not available here."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    adir = RunDir(run_dir).adapter
    if not adir.is_dir():
        raise UserError(f"{run_dir}: no adapter/ directory (is the run complete? its summary.json says "
                        f"{_status(run_dir)})")
    model, tokenizer = build_base_model(cfg, model_path)
    if dtype is not None:
        from nora.models.causal_lm import resolve_dtype

        model = model.to(resolve_dtype(dtype))
    model, identity = apply_adapter(model, adir)
    if device is not None:
        model = model.to(device)
    return TrainedModel(model, tokenizer, cfg, identity, read_summary(run_dir))


def _status(run_dir: Path) -> str:
    if not RunDir(run_dir).summary.exists():
        return "nothing (no summary.json)"
    summary = read_summary(run_dir)
    return str(summary.get("status")) if summary is not None else "nothing readable"
