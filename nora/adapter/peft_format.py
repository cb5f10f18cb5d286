"""NoRA's adapter files in peft's layout (``peft_type`` ``NORA``, :mod:`nora.tuner`), read and written without peft:
``adapter_config.json`` (the NoraPeftConfig as JSON, :func:`config_json`) and ``adapter_model.safetensors``, whose NoRA
tensors are keyed ``base_model.model.<activation>.nora_activation.<tensor>`` (next to LoRA's ``lora_A``/``lora_B``
keys in a NoRA++ adapter). The curves and the subspace analysis read a run's activations through
:func:`read_nora_layers`; nora.tuner names its layers with :data:`LAYER_ATTR` and adds the LoRA part of a NoRA++
adapter to :func:`nora.save_nora` through :func:`register_lora_part`."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from torch import nn

from nora.adapter.config import AdapterError
from nora.adapter.discover import strip_peft

PEFT_TYPE = "NORA"  # peft's PeftType member nora.tuner adds
LAYER_ATTR = "nora_activation"  # the NoraLayer attribute holding one NoraActivation per adapter
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
NORA_MARKER = f".{LAYER_ATTR}."  # in a saved key: base_model.model.<activation>.nora_activation.<tensor>
ORIGINALS_KEY = "nora_originals"  # safetensors metadata: activation name -> the activation it replaced

# peft's own PeftConfig bookkeeping at its defaults (peft's to declare; a core install cannot import it, so this copy
# is checked against peft's in tests/test_adapter.py)
PEFT_BOOKKEEPING: dict[str, Any] = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "inference_mode": False,
    "peft_version": None,
    "revision": None,
    "task_type": None,
}
# NoraPeftConfig's fields beyond NoraConfig's, declared here (NoraPeftConfig takes its defaults from this table): the
# LoRA part of NoRA++ (absent in NoRA alone), the modules saved whole, what nora records of each activation
LORA_PART_DEFAULTS: dict[str, Any] = {
    "lora_r": 0,
    "lora_alpha": 16.0,
    "lora_dropout": 0.0,
    "lora_target_modules": None,
    "use_dora": False,
    "lora_extra": None,
    "modules_to_save": None,
    "layer_specs": None,
}
PEFT_DEFAULTS = {**PEFT_BOOKKEEPING, **LORA_PART_DEFAULTS}  # every NoraPeftConfig field that is not NoraConfig's

# (fields, tensors) of a peft-wrapped model's LoRA/DoRA part; set by nora.tuner (NoRA++ needs peft)
LoraPart = Callable[[nn.Module, dict], "tuple[dict[str, Any], dict[str, torch.Tensor]]"]
_lora_part: list[LoraPart] = []


def register_lora_part(fn: LoraPart) -> None:
    """``fn(model, nora_fields)`` -> the LoRA fields of NoraPeftConfig (``lora_r``, ..., ``modules_to_save``) and
    peft's LoRA tensors of a peft-wrapped ``model``: how :func:`nora.save_nora` writes NoRA++ (nora.tuner registers
    it where peft is installed)."""
    _lora_part[:] = [fn]


def lora_part(model: nn.Module, fields: dict) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not _lora_part:
        raise AdapterError(
            "this model has a peft adapter (LoRA/DoRA) next to NoRA: writing NoRA++ needs nora.tuner, which "
            "`import nora` loads where peft, transformers and accelerate import"
        )
    return _lora_part[0](model, fields)


def _peft_version() -> str | None:
    """The installed peft's version, as peft's PeftConfig records it (None without peft: peft fills it in on load)."""
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


def config_json(fields: dict[str, Any]) -> str:
    """``adapter_config.json`` of a NoRA adapter whose NoraPeftConfig has ``fields`` (the others at their defaults):
    exactly the text ``NoraPeftConfig(**fields).save_pretrained`` writes, without importing peft."""
    out = {**PEFT_DEFAULTS, "peft_version": _peft_version(), **fields, "peft_type": PEFT_TYPE}
    for key in ("degrees", "fit_range"):
        out[key] = [(int if key == "degrees" else float)(v) for v in out[key]]
    if isinstance(out.get("target_modules"), str):
        out["target_modules"] = [out["target_modules"]]
    for key, value in out.items():
        if isinstance(value, (set, frozenset, tuple)):
            out[key] = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return json.dumps(out, indent=2, sort_keys=True)


def read_peft_nora_config(directory: str | os.PathLike) -> dict | None:
    """The ``adapter_config.json`` of ``directory`` if it is a NoRA peft adapter, None if there is none or it is
    another peft method's. :class:`AdapterError` naming the file when it is truncated or not JSON, has no
    ``peft_type``, or names another method (``LORA``) while ``adapter_model.safetensors`` holds NoRA tensors (peft
    would build that method and leave NoRA out)."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(
            f"{path}: not readable JSON ({type(exc).__name__}: {exc}); the file is truncated or "
            "damaged: copy the adapter again or retrain it"
        ) from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("peft_type"), str):
        raise AdapterError(
            f"{path}: no peft_type (a peft adapter config names its method; a NoRA adapter says "
            f'"peft_type": "{PEFT_TYPE}"); the file is damaged or was edited'
        )
    if cfg["peft_type"] == PEFT_TYPE:
        return cfg
    weights = Path(directory) / WEIGHTS_FILE
    if "nora_peft_type" not in cfg and weights.is_file() and _holds_nora_tensors(weights):
        raise AdapterError(
            f"{path} says peft_type {cfg['peft_type']!r}, but {weights} holds NoRA tensors (keys "
            f"*{NORA_MARKER}*): loaded as {cfg['peft_type']}, NoRA would be left out; the adapter "
            f'config was edited: restore "peft_type": "{PEFT_TYPE}"'
        )
    return None


def nora_tensor(key: str) -> tuple[str, str] | None:
    """``(activation, tensor)`` of a saved key holding a NoRA tensor (the activation's name in the base model, peft's
    prefix and ``base_layer`` segments dropped, as :func:`nora.adapter.discover.canonical_name` does), else None."""
    name, marker, tensor = key.partition(NORA_MARKER)
    return (strip_peft(name), tensor) if marker else None


def _holds_nora_tensors(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return any(NORA_MARKER in k for k in fh.keys())
    except Exception:  # noqa: BLE001  an unreadable file: its reader says so
        return False


def read_nora_layers(directory: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Activation name (as :func:`nora_tensor` gives it) -> its NoRA tensors (``base_numerator``, ``nora_A_num``,
    ...)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(Path(directory) / WEIGHTS_FILE), framework="pt") as fh:
        for key in fh.keys():
            if (split := nora_tensor(key)) is not None:
                layers.setdefault(split[0], {})[split[1]] = fh.get_tensor(key)
    return layers


def read_originals(directory: str | os.PathLike) -> dict[str, str]:
    """Activation name -> the activation it replaced (``silu``), where the writer recorded it: in ``layer_specs``
    (every adapter nora.save_nora writes), or in the weights file's metadata (nora.tuner's writer before it)."""
    try:
        specs = (read_peft_nora_config(directory) or {}).get("layer_specs")
    except AdapterError:
        specs = None
    if isinstance(specs, dict):
        return {n: s["original"] for n, s in specs.items() if isinstance(s, dict) and s.get("original")}
    with safe_open(str(Path(directory) / WEIGHTS_FILE), framework="pt") as fh:
        meta = fh.metadata() or {}
    try:
        return dict(json.loads(meta.get(ORIGINALS_KEY, "{}")))
    except ValueError:
        return {}
