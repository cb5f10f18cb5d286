"""One peft adapter from a model nora built the lower-level way (``peft.get_peft_model`` with a ``LoraConfig``, then
``nora.apply_nora``; or ``apply_nora`` alone on a Hugging Face model), and loading either format.

:func:`save_pretrained` writes what ``NoraModel`` would have saved for the same weights: ``adapter_config.json``
(a :class:`NoraPeftConfig`: the NoRA config plus the LoRA config's ``r``, ``lora_alpha``, ``lora_dropout``,
``target_modules``, ``use_dora``, ``modules_to_save``) and ``adapter_model.safetensors`` (peft's own LoRA state dict
and each NoRA activation's tensors under ``<activation>.nora_activation.``), so ``peft.PeftModel.from_pretrained``
rebuilds the same function. :func:`load_pretrained` reads that, or a directory in the earlier two-part format
(``nora.save_nora_pp``'s peft files next to ``nora_config.json``/``nora_adapter.safetensors``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from nora.adapter import AdapterError, NoraActivation, canonical_name, get_nora_config, load_nora_pp, nora_modules
from nora.adapter.inject import is_peft_model
from nora.adapter.peft_format import (
    CONFIG_FILE,
    LAYER_ATTR,
    ORIGINALS_KEY,
    PEFT_PREFIX,
    WEIGHTS_FILE,
    read_peft_nora_config,
)
from nora.files import atomic_write
from nora.tuner.config import NoraPeftConfig


def peft_config_of(model: nn.Module) -> NoraPeftConfig:
    """The NoraPeftConfig describing ``model``'s NoRA config and (on a peft model) its LoRA config."""
    nora_cfg = get_nora_config(model)
    if nora_cfg is None or not nora_modules(model):
        raise AdapterError("this model holds no NoRA activations; call nora.apply_nora first")
    kw = {k: v for k, v in nora_cfg.to_dict().items() if k not in ("trainable_modules",)}
    kw["modules_to_save"] = list(trainable_modules(model)) or None  # NoRA's trainable_modules: peft's modules_to_save
    kw["layer_specs"] = {
        name: {"width": mod.width, "channel_dim": mod.channel_dim, "original": mod.original, "init": nora_cfg.init}
        for name, mod in nora_modules(model).items()
    }
    if is_peft_model(model):
        lora = model.peft_config[model.active_adapter]
        if type(lora).__name__ != "LoraConfig":
            raise AdapterError(f"a {type(lora).__name__} adapter next to NoRA is not a NoRA++ adapter (LoRA/DoRA)")
        targets = lora.target_modules
        kw.update(
            lora_r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            use_dora=lora.use_dora,
            lora_target_modules=sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
            modules_to_save=sorted(set(lora.modules_to_save or []) | set(kw["modules_to_save"] or [])) or None,
            task_type=lora.task_type,
            base_model_name_or_path=lora.base_model_name_or_path,
            lora_extra=lora_extra(lora),
        )
    return NoraPeftConfig(**kw)


# LoraConfig fields NoraPeftConfig has fields of its own for, and PeftConfig's bookkeeping
_MAPPED = {
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_dora",
    "modules_to_save",
    "task_type",
    "peft_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
}


def lora_extra(lora) -> dict | None:
    """Every other field of ``lora`` that differs from LoraConfig's default and can be written as JSON (the MoE
    ``target_parameters`` and rank/alpha patterns transformers' weight conversion adds, exclusions, bias, ...)."""
    from peft import LoraConfig

    default = LoraConfig()
    extra = {}
    for f in dataclasses.fields(lora):
        value = getattr(lora, f.name)
        if f.name in _MAPPED or value == getattr(default, f.name, None):
            continue
        value = sorted(value) if isinstance(value, (set, frozenset)) else value
        try:
            json.dumps(value)
        except TypeError:
            continue
        extra[f.name] = value
    return extra or None


def trainable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name in the base model -> module, for the modules ``NoraConfig.trainable_modules`` names (a new head)."""
    patterns = [re.compile(p) for p in get_nora_config(model).trainable_modules]
    base = model.get_base_model() if is_peft_model(model) else model
    return {n: m for n, m in base.named_modules() if n and any(p.fullmatch(n) for p in patterns)}


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model``'s LoRA/DoRA (if any) and NoRA parts as one NoRA peft adapter (see the module docstring)."""
    directory = Path(directory)
    config = peft_config_of(model)
    tensors = dict(get_peft_model_state_dict(model)) if is_peft_model(model) else {}
    originals = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, NoraActivation):
            continue
        # peft's keys are the real module paths (an activation inside a module whose parameters LoRA wraps sits
        # under base_layer segments, in this model and in the one NoraModel rebuilds)
        key = name if is_peft_model(model) else PEFT_PREFIX + name
        for k, t in mod.state_dict().items():
            if k == "base_numerator":  # NoraLayer keeps one row per group (every adapter has the same shapes)
                t = t.expand(mod.groups, -1)
            tensors[f"{key}.{LAYER_ATTR}.{k}"] = t.detach().cpu().contiguous()
        originals[canonical_name(model, name)] = mod.original
    for name, mod in trainable_modules(model).items():  # saved as peft saves modules_to_save: by module name
        for k, t in mod.state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{k}"] = t.detach().cpu().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", ORIGINALS_KEY: json.dumps(originals)}
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata=meta))
    config.save_pretrained(str(directory))
    return directory


def is_peft_format(directory: str | os.PathLike) -> bool:
    return read_peft_nora_config(directory) is not None


def load_pretrained(base_model: nn.Module, directory: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """A NoRA / NoRA++ adapter onto ``base_model``: ``peft.PeftModel.from_pretrained`` for the peft format, the
    earlier two-part format through ``nora.adapter.io.load_nora_pp``."""
    if is_peft_format(directory):
        return PeftModel.from_pretrained(base_model, str(directory), is_trainable=trainable)
    if not (Path(directory) / CONFIG_FILE).exists():
        raise AdapterError(f"{directory}: no {CONFIG_FILE} (a NoRA peft adapter or a NoRA++ directory expected)")
    return load_nora_pp(base_model, directory, trainable=trainable)
