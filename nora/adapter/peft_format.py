"""Reading a NoRA adapter saved in peft's format (``peft_type`` ``NORA``, :mod:`nora.tuner`) from its files alone,
without peft: ``adapter_config.json`` (the NoraPeftConfig as JSON) and ``adapter_model.safetensors``, whose NoRA
tensors are keyed ``base_model.model.<activation>.nora_activation.<tensor>`` (next to LoRA's ``lora_A``/``lora_B``
keys in a NoRA++ adapter). The curves and the subspace analysis read a run's activations through
:func:`read_nora_layers`; nora.tuner names its layers with :data:`LAYER_ATTR`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from nora.adapter.config import AdapterError

PEFT_TYPE = "NORA"  # peft's PeftType member nora.tuner adds
LAYER_ATTR = "nora_activation"  # the NoraLayer attribute holding one NoraActivation per adapter
PEFT_PREFIX = "base_model.model."
PEFT_SEGMENT = "base_layer"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
ORIGINALS_KEY = "nora_originals"  # safetensors metadata: activation name -> the activation it replaced


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
            f"*.{LAYER_ATTR}.*): loaded as {cfg['peft_type']}, NoRA would be left out; the adapter "
            f'config was edited: restore "peft_type": "{PEFT_TYPE}"'
        )
    return None


def _holds_nora_tensors(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return any(f".{LAYER_ATTR}." in k for k in fh.keys())
    except Exception:  # noqa: BLE001  an unreadable file: its reader says so
        return False


def read_nora_layers(directory: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Activation name (in the base model: peft's ``base_layer`` segments dropped, as
    :func:`nora.adapter.discover.canonical_name` does) -> its NoRA tensors (``base_numerator``, ``nora_A_num``,
    ...)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    marker = f".{LAYER_ATTR}."
    with safe_open(str(Path(directory) / WEIGHTS_FILE), framework="pt") as fh:
        for key in fh.keys():
            if marker in key:
                name, _, tensor = key.partition(marker)
                name = ".".join(p for p in name.removeprefix(PEFT_PREFIX).split(".") if p != PEFT_SEGMENT)
                layers.setdefault(name, {})[tensor] = fh.get_tensor(key)
    return layers


def read_originals(directory: str | os.PathLike) -> dict[str, str]:
    """Activation name -> the activation it replaced (``silu``), where the writer recorded it."""
    with safe_open(str(Path(directory) / WEIGHTS_FILE), framework="pt") as fh:
        meta = fh.metadata() or {}
    try:
        return dict(json.loads(meta.get(ORIGINALS_KEY, "{}")))
    except ValueError:
        return {}
