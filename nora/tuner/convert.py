"""The LoRA/DoRA part of a NoRA++ adapter written by :func:`nora.save_nora` from a model nora built the lower-level
way (``peft.get_peft_model`` with a ``LoraConfig``, then ``nora.apply_nora``).

``nora.save_nora`` (:mod:`nora.adapter.io`) writes the NoRA part without peft; on a peft-wrapped model it adds what
:func:`lora_part` returns (registered on import): the LoRA config's ``r``, ``lora_alpha``, ``lora_dropout``,
``target_modules``, ``use_dora``, ``modules_to_save`` and any other non-default field as the ``lora_*`` fields of
:class:`NoraPeftConfig`, and peft's own LoRA state dict, so that one ``adapter_config.json`` and one
``adapter_model.safetensors`` hold the whole adapter and ``peft.PeftModel.from_pretrained`` rebuilds the same
function. :func:`peft_config_of` is that config as a :class:`NoraPeftConfig`.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from peft import get_peft_model_state_dict
from torch import nn

from nora.adapter import AdapterError
from nora.adapter.io import adapter_contents
from nora.adapter.peft_format import register_lora_part
from nora.tuner.config import NoraPeftConfig


def peft_config_of(model: nn.Module) -> NoraPeftConfig:
    """The NoraPeftConfig describing ``model``'s NoRA config and (on a peft model) its LoRA config: the config
    ``nora.save_nora`` writes."""
    return NoraPeftConfig(**adapter_contents(model)[0])


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


def lora_part(model: nn.Module, fields: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """The LoRA/DoRA fields (NoraPeftConfig's ``lora_*``, ``modules_to_save`` with NoRA's, ``task_type``,
    ``base_model_name_or_path``) and peft's LoRA tensors of the peft-wrapped ``model`` whose NoRA part is
    ``fields``; the whole config is checked by building the NoraPeftConfig."""
    lora = model.peft_config[model.active_adapter]
    if type(lora).__name__ != "LoraConfig":
        raise AdapterError(f"a {type(lora).__name__} adapter next to NoRA is not a NoRA++ adapter (LoRA/DoRA)")
    targets = lora.target_modules
    update = dict(
        lora_r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        use_dora=lora.use_dora,
        lora_target_modules=sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        modules_to_save=sorted(set(lora.modules_to_save or []) | set(fields.get("modules_to_save") or [])) or None,
        task_type=lora.task_type,
        base_model_name_or_path=lora.base_model_name_or_path,
        lora_extra=lora_extra(lora),
    )
    NoraPeftConfig(**{**fields, **update})  # its checks, before anything is written
    return update, dict(get_peft_model_state_dict(model))


register_lora_part(lora_part)
