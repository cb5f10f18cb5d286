"""Save a merged NoRA model as a whole Hugging Face model and load it back with its rational activations.

``model.save_pretrained(dir)`` alone writes the rational coefficients into the checkpoint, but
``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds the model's own activation (SiLU, GELU) and drops
them as unexpected keys. The pair here keeps them::

    nora.merge_nora(model)                       # NoRA updates folded into plain rationals
    nora.save_merged(model, "merged/")           # save_pretrained + nora_merged.{json,safetensors}
    model = nora.from_pretrained("merged/")      # AutoModelForCausalLM + the rationals put back

``nora_merged.json`` names each rational activation (groups, form, degrees, original activation, fit range, whether
it is in the residual form); ``nora_merged.safetensors`` holds its coefficients (in the residual form also the fit it
adds the change of to the original activation), keyed by module name; the checkpoint itself holds
everything else (no rational buffers, so the loader reports no unexpected keys).
"""
from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from nora.adapter.config import AdapterError
from nora.adapter.inject import is_peft_model, nora_modules, set_module
from nora.adapter.layer import GroupRational
from nora.files import atomic_write, read_json, write_json_atomic

MERGED_CONFIG = "nora_merged.json"
MERGED_WEIGHTS = "nora_merged.safetensors"
MERGED_FORMAT_VERSION = 1


def rational_modules(model: nn.Module) -> dict[str, GroupRational]:
    """Module name -> every rational activation of ``model`` (merged or not)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GroupRational)}


def save_merged(model: nn.Module, directory: str | os.PathLike, **save_pretrained_kwargs) -> Path:
    """``model.save_pretrained(directory)`` plus the rational activations :func:`from_pretrained` needs."""
    if is_peft_model(model):
        raise AdapterError("save_merged expects a plain model: fold peft's adapters in first "
                           "(model = model.merge_and_unload()) and NoRA's with nora.merge_nora(model)")
    if nora_modules(model):
        raise AdapterError("this model still holds trainable NoRA activations; call nora.merge_nora(model) first")
    rationals = rational_modules(model)
    if not rationals:
        raise AdapterError("this model holds no rational activations; save it with model.save_pretrained")
    if not hasattr(model, "save_pretrained"):
        raise AdapterError(f"{type(model).__name__} has no save_pretrained (a Hugging Face model is expected); "
                           "save its state_dict and the NoRA adapter (nora.save_nora before merging) instead")
    directory = Path(directory)
    # the checkpoint without the rational buffers (they go to nora_merged.safetensors), so that loading it reports
    # no unexpected keys
    state = save_pretrained_kwargs.pop("state_dict", None) or model.state_dict()
    prefixes = tuple(f"{name}." for name in rationals)
    state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    model.save_pretrained(str(directory), state_dict=state, **save_pretrained_kwargs)
    tensors, layers = {}, {}
    for name, mod in rationals.items():
        for key, t in mod.state_dict().items():  # base_* (and, in the residual form, fit_*) coefficients
            tensors[f"{name}.{key}"] = t.detach().cpu().contiguous()
        layers[name] = {"groups": mod.groups, "form": mod.form, "degrees": list(mod.degrees),
                        "original": mod.original, "fit_range": mod.fit_range, "channel_dim": mod.channel_dim,
                        "width": mod.width, "residual": mod.residual}
    atomic_write(directory / MERGED_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_json_atomic(directory / MERGED_CONFIG, {"format_version": MERGED_FORMAT_VERSION, "layers": layers})
    return directory


def put_back_rationals(model: nn.Module, directory: str | os.PathLike, backend: str = "auto") -> nn.Module:
    """Replace the activations named in ``directory/nora_merged.json`` by the saved rationals, in place."""
    directory = Path(directory)
    meta = read_json(directory / MERGED_CONFIG)
    if not isinstance(meta, dict) or meta.get("format_version") != MERGED_FORMAT_VERSION:
        raise AdapterError(f"{directory}: no readable {MERGED_CONFIG} (write it with nora.save_merged)")
    tensors = load_file(str(directory / MERGED_WEIGHTS))
    missing = []
    for name in meta["layers"]:
        try:
            model.get_submodule(name)
        except AttributeError:
            missing.append(name)
    if missing:
        raise AdapterError(f"{directory}: the saved rationals {missing[:4]} are not modules of this "
                           f"{type(model).__name__}")
    device = next(iter(model.parameters())).device
    for name, info in meta["layers"].items():
        residual = bool(info.get("residual", False))  # saved before the residual form: the paper's
        if residual and not {f"{name}.fit_numerator", f"{name}.fit_denominator"} <= set(tensors):
            raise AdapterError(f"{directory / MERGED_WEIGHTS}: {name} is in the residual form but its fit "
                               "coefficients (fit_numerator, fit_denominator) are missing")
        mod = GroupRational(tensors[f"{name}.base_numerator"], tensors[f"{name}.base_denominator"],
                            form=info["form"], backend=backend, original=info["original"],
                            fit_range=info["fit_range"], channel_dim=info.get("channel_dim", -1),
                            width=info.get("width"), residual=residual,
                            fit_numerator=tensors.get(f"{name}.fit_numerator") if residual else None,
                            fit_denominator=tensors.get(f"{name}.fit_denominator") if residual else None,
                            original_module=model.get_submodule(name))
        set_module(model, name, mod.to(device))
    return model


def from_pretrained(directory: str | os.PathLike, model_class=None, **kwargs) -> nn.Module:
    """Load a model written by :func:`save_merged`: ``model_class.from_pretrained(directory, **kwargs)``
    (default ``transformers.AutoModelForCausalLM``) with its rational activations put back."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    if not (Path(directory) / MERGED_CONFIG).exists():
        raise AdapterError(f"{directory}: no {MERGED_CONFIG}; nora.from_pretrained loads what nora.save_merged "
                           "wrote (a plain model loads with its own from_pretrained)")
    model = model_class.from_pretrained(str(directory), **kwargs)
    return put_back_rationals(model, directory)
