"""Save only the adapter, load it onto a freshly built base model, merge it for inference.

Files written by :func:`save_nora` into a directory:

* ``nora_adapter.safetensors``: every NoRA activation's tensors (base coefficients and trainable
  update) and the parameters of ``trainable_modules`` (e.g. a new classifier head), keyed by the
  module's name in the unwrapped base model, so a file saved from a peft-wrapped model loads onto a
  plain one and vice versa;
* ``nora_config.json``: the :class:`NoraConfig` and, per replaced activation, its groups, form,
  degrees, variant and original activation.

peft's own LoRA/DoRA files (``adapter_model.safetensors``, ``adapter_config.json``) may live in the
same directory (NoRA++): save them with ``model.save_pretrained(dir)`` and load them with
:func:`load_nora_pp`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nora.adapter.config import NoraConfig
from nora.adapter.inject import (_set_module, canonical_name, get_nora_config, is_peft_model, mark_trainable,
                                 nora_modules, resolve_name, set_trainable, _store_config)
from nora.adapter.layer import GroupRational, NoraActivation

WEIGHTS_NAME = "nora_adapter.safetensors"
CONFIG_NAME = "nora_config.json"
FORMAT_VERSION = 1


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _trainable_module_names(model: nn.Module, config: NoraConfig) -> list[str]:
    import re

    if is_peft_model(model):
        return []  # peft saves its modules_to_save itself
    rx = [re.compile(p) for p in config.trainable_modules]
    return [n for n, _ in model.named_modules() if any(r.fullmatch(n) for r in rx)]


def save_nora(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the NoRA adapter of ``model`` (and its ``trainable_modules``) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = get_nora_config(model)
    mods = nora_modules(model)
    if config is None or not mods:
        raise ValueError("this model holds no NoRA activations; call nora.apply_nora first")
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for name, mod in mods.items():
        for k, t in mod.state_dict().items():
            tensors[f"{name}.{k}"] = t.detach().cpu().contiguous()
        layers[name] = {"groups": mod.groups, "form": mod.form, "degrees": list(mod.degrees),
                        "variant": mod.variant, "original": mod.original, "r": mod.r, "alpha": mod.alpha,
                        "numerator_mode": mod.numerator_mode, "fit_range": mod.fit_range,
                        "shared_base_numerator": mod.base_numerator.shape[0] == 1}
    extra = _trainable_module_names(model, config)
    for name in extra:
        for k, t in model.get_submodule(name).state_dict().items():
            tensors[f"{name}.{k}"] = t.detach().cpu().contiguous()
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "layers": layers,
            "trainable_modules": extra}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2)))
    return directory


def read_nora_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"no NoRA adapter at {directory} (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    return json.loads(path.read_text())


def load_nora(model: nn.Module, directory: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Load a saved NoRA adapter onto ``model`` (a fresh base model, peft-wrapped or not), in place.

    The activations named in the file are replaced (no fitting: the saved coefficients are used) and
    every tensor is loaded strictly. The model is left frozen unless ``trainable=True``.
    """
    directory = Path(directory)
    meta = read_nora_config(directory)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: unsupported NoRA adapter format {meta.get('format_version')}")
    config = NoraConfig.from_dict(meta["config"])
    tensors = load_file(str(directory / WEIGHTS_NAME))
    device = next(iter(model.parameters())).device
    for name, info in meta["layers"].items():
        full = resolve_name(model, name)
        try:
            model.get_submodule(full)
        except AttributeError:
            raise ValueError(f"{directory}: the adapter targets {name!r}, which this "
                             f"{type(model).__name__} does not have") from None
        num = tensors[f"{name}.base_numerator"]
        den = tensors[f"{name}.base_denominator"]
        mod = NoraActivation(num, den, form=info["form"], backend=config.backend, original=info["original"],
                             variant=info["variant"], r=info["r"], alpha=info["alpha"],
                             numerator_mode=info["numerator_mode"], groups=info["groups"],
                             fit_range=info.get("fit_range"))
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        mod.load_state_dict(state, strict=True)
        _set_module(model, full, mod.to(device))
    for name in meta["trainable_modules"]:
        sub = model.get_submodule(resolve_name(model, name))
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        sub.load_state_dict(state, strict=True)
    _store_config(model, config)
    if trainable:
        set_trainable(model, config)
    else:
        model.requires_grad_(False)
    return model


def merge_nora(model: nn.Module) -> nn.Module:
    """Fold every NoRA update into plain per-group coefficients (frozen :class:`GroupRational`)."""
    for name, mod in nora_modules(model).items():
        _set_module(model, resolve_name(model, name), mod.merged())
    return model


def save_nora_pp(model: nn.Module, directory: str | os.PathLike) -> Path:
    """NoRA++: peft's LoRA/DoRA files and the NoRA adapter side by side in ``directory``."""
    if not is_peft_model(model):
        raise ValueError("save_nora_pp expects a peft-wrapped model (LoRA/DoRA + NoRA)")
    model.save_pretrained(str(directory))
    return save_nora(model, directory)


def load_nora_pp(base_model: nn.Module, directory: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Rebuild a NoRA++ model: peft adapter from ``directory`` onto ``base_model``, then NoRA on top."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(directory), is_trainable=trainable)
    load_nora(model, directory, trainable=trainable)
    if trainable:
        mark_trainable(model)
    return model


__all__ = ["save_nora", "load_nora", "merge_nora", "save_nora_pp", "load_nora_pp", "read_nora_config",
           "GroupRational", "canonical_name"]
