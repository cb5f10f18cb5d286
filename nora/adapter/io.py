"""Save only the adapter, load it onto a freshly built base model, merge it for inference.

Files written by :func:`save_nora` into a directory:

* ``nora_adapter.safetensors``: every NoRA activation's tensors (base coefficients and trainable
  update) and the parameters of ``trainable_modules`` (e.g. a new classifier head), keyed by the
  module's name in the unwrapped base model, so a file saved from a peft-wrapped model loads onto a
  plain one and vice versa;
* ``nora_config.json``: the :class:`NoraConfig` and, per replaced activation, its groups, form,
  degrees, width, variant and original activation.

NoRA++ (:func:`save_nora_pp`, or ``model.save_pretrained(dir)`` followed by :func:`save_nora` on the
peft-wrapped model) puts peft's LoRA/DoRA files (``adapter_model.safetensors``, ``adapter_config.json``)
in the same directory. Its ``adapter_config.json`` carries a ``peft_type`` no peft version knows (the real
one is kept under ``nora_peft_type``), so peft-only loaders (``PeftModel.from_pretrained``, transformers'
``load_adapter``, lm_eval's ``hf`` model with ``peft=``) stop with an error naming :func:`load_nora_pp`
instead of loading the LoRA half and silently dropping NoRA.

:func:`load_nora` checks the whole adapter against the model before it changes anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nora.adapter.config import AdapterError, NoraConfig
from nora.adapter.discover import activation_layout, canonical_name, is_peft_model, module_index, resolve_name
from nora.adapter.inject import (
    describe_targets,
    find_targets,
    freeze_batchnorm_statistics,
    get_nora_config,
    mark_trainable,
    nora_modules,
    set_module,
    set_trainable,
    store_config,
    trainable_module_names,
)
from nora.adapter.layer import GroupRational, NoraActivation
from nora.adapter.merged import as_merged_model
from nora.adapter.validate import check_finite, saved_layer_problems
from nora.errors import MissingFileError
from nora.files import atomic_write, read_json, write_json_atomic

WEIGHTS_NAME = "nora_adapter.safetensors"
CONFIG_NAME = "nora_config.json"
FORMAT_VERSION = 1
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
FULL_FT_NAME = "trainable.safetensors"
# an adapter directory's files, by kind: the first of each names the kind (nora.app.adapters reads them)
PEFT_FILES = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)
NORA_FILES = (CONFIG_NAME, WEIGHTS_NAME)
# what peft shows when it meets a NoRA++ adapter_config.json (its KeyError prints the unknown peft_type)
NORA_PP_PEFT_TYPE = (
    "NORA++ adapter (peft LoRA/DoRA + NoRA activations): peft alone would load only the LoRA "
    "half; load it with nora.load_nora_pp(base_model, dir), or evaluate it with lm_eval's "
    "`nora` model (python -m nora.integrations.lm_eval --model nora ...)"
)


_PEFT_KEYS = ("lora_", "modules_to_save.", "original_module.")


def canonical_state(model: nn.Module, module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` keyed by canonical names (peft's ``base_layer`` segments removed, peft's own
    adapter tensors left out: peft saves those), so it loads onto the module with or without LoRA."""
    out = {}
    for k, t in module.state_dict().items():
        if any(mark in k for mark in _PEFT_KEYS):
            continue
        out[".".join(p for p in k.split(".") if p != "base_layer") if is_peft_model(model) else k] = t
    return out


def _load_canonical_state(model: nn.Module, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = canonical_state(model, module)
    if set(own) != set(state):
        raise AdapterError(
            f"state keys differ: missing {sorted(set(own) - set(state))[:4]}, "
            f"unexpected {sorted(set(state) - set(own))[:4]}"
        )
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k])


def _check_save_directory(model: nn.Module, directory: Path) -> None:
    """Refuse to add NoRA files to a directory of another adapter (it would later load as something else)."""
    if (directory / FULL_FT_NAME).exists():
        raise AdapterError(
            f"{directory} holds {FULL_FT_NAME} (a full fine-tuning / linear probe adapter); "
            "save the NoRA adapter into an empty directory"
        )
    if (directory / PEFT_CONFIG_NAME).exists() and not is_peft_model(model):
        raise AdapterError(
            f"{directory} holds peft adapter files ({PEFT_CONFIG_NAME}) but this model has no peft "
            "adapter: NoRA files next to them would load as a NoRA++ adapter of another model; save "
            "into an empty directory (NoRA++: nora.save_nora_pp on the peft-wrapped model)"
        )


def save_nora(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the NoRA adapter of ``model`` (and its ``trainable_modules``) to ``directory``.

    On a peft-wrapped model whose ``save_pretrained`` already wrote ``directory/adapter_config.json``, that
    file is marked as NoRA++ (see the module docstring)."""
    directory = Path(directory)
    config = get_nora_config(model)
    mods = nora_modules(model)
    if config is None or not mods:
        raise AdapterError("this model holds no NoRA activations; call nora.apply_nora first")
    _check_save_directory(model, directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    index = module_index(model)
    for name, mod in mods.items():
        for k, t in mod.state_dict().items():
            tensors[f"{name}.{k}"] = t.detach().cpu().contiguous()
        width = mod.width if mod.width is not None else activation_layout(model, name, index).width
        layers[name] = {
            "groups": mod.groups,
            "form": mod.form,
            "degrees": list(mod.degrees),
            "width": width,
            "channel_dim": mod.channel_dim,
            "variant": mod.variant,
            "original": mod.original,
            "r": mod.r,
            "alpha": mod.alpha,
            "numerator_mode": mod.numerator_mode,
            "fit_range": mod.fit_range,
            "residual": mod.residual,
            "shared_base_numerator": mod.base_numerator.shape[0] == 1,
        }
    extra = trainable_module_names(model, config)
    for name in extra:
        for k, t in canonical_state(model, model.get_submodule(resolve_name(model, name, index))).items():
            tensors[f"{name}.{k}"] = t.detach().cpu().contiguous()
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "layers": layers, "trainable_modules": extra}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_json_atomic(directory / CONFIG_NAME, meta)
    if is_peft_model(model) and (directory / PEFT_CONFIG_NAME).exists():
        _mark_nora_pp(directory)
    return directory


def _mark_nora_pp(directory: Path) -> None:
    cfg = json.loads((directory / PEFT_CONFIG_NAME).read_text())
    if cfg.get("peft_type") != NORA_PP_PEFT_TYPE:
        cfg["nora_peft_type"], cfg["peft_type"] = cfg["peft_type"], NORA_PP_PEFT_TYPE
        write_json_atomic(directory / PEFT_CONFIG_NAME, cfg)


def read_peft_config(directory: str | os.PathLike) -> dict:
    """The peft ``adapter_config.json`` in ``directory`` as peft wrote it (a NoRA++ marker undone)."""
    path = Path(directory) / PEFT_CONFIG_NAME
    cfg = read_json(path)
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise AdapterError(f"{path}: missing or not a peft adapter config (no peft_type)")
    if "nora_peft_type" in cfg:
        cfg["peft_type"] = cfg.pop("nora_peft_type")
    return cfg


def read_nora_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise MissingFileError(f"no NoRA adapter at {directory} (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(
            f"{path}: not a readable NoRA config ({type(exc).__name__}: {exc}); the file is "
            "truncated or damaged: copy the adapter again or retrain it"
        ) from None
    kinds = {"config": dict, "layers": dict, "trainable_modules": list}
    bad = [k for k, kind in kinds.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), kind)]
    if bad:
        raise AdapterError(
            f"{path}: not a NoRA config (missing or malformed: {', '.join(bad)}); copy the adapter again or retrain it"
        )
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file; :class:`AdapterError` naming it when it does not parse (truncated,
    overwritten) or holds a NaN or inf (a diverged run saved by another tool)."""
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise MissingFileError(f"{path} is missing (next to {CONFIG_NAME})") from None
    except Exception as exc:  # noqa: BLE001  safetensors raises its own SafetensorError (and OSError, ValueError)
        raise AdapterError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); the file is "
            "truncated or damaged: copy the adapter again or retrain it"
        ) from None
    check_finite(tensors, path)
    return tensors


def _shape_mismatches(model: nn.Module, module: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> list[str]:
    own = canonical_state(model, module)
    saved = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
    bad = [
        f"{name}.{k}: saved {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in saved.items()
        if k in own and own[k].shape != v.shape
    ]
    bad += [f"{name}.{k}: missing from the file" for k in own if k not in saved]
    bad += [f"{name}.{k}: not in the model" for k in saved if k not in own]
    return bad


def _check_targets(model: nn.Module, directory: Path, meta: dict, config: NoraConfig) -> list[str]:
    """Every saved layer exists, is an activation, is the one the adapter was fitted to and has its saved width
    (:func:`nora.adapter.validate.saved_layer_problems`), and every target the config names is in the adapter."""
    problems = saved_layer_problems(model, meta["layers"], module_index(model))
    try:
        targets = find_targets(model, config)
    except ValueError as e:
        return problems + [str(e)]
    left_out = sorted(set(targets) - set(meta["layers"]))
    if left_out:
        problems.append(
            f"the model has {len(targets)} targets ({describe_targets(config)}), the adapter covers "
            f"{len(meta['layers'])}; no adapter for {', '.join(left_out[:4])}" + (" ..." if len(left_out) > 4 else "")
        )
    return problems


def _validate(
    model: nn.Module, directory: Path, meta: dict, tensors: dict[str, torch.Tensor], config: NoraConfig
) -> None:
    if nora_modules(model):
        raise AdapterError(
            f"this {type(model).__name__} already holds NoRA activations; load {directory} onto a "
            "freshly built base model"
        )
    problems = _check_targets(model, directory, meta, config)
    for name in meta["trainable_modules"]:
        try:
            sub = model.get_submodule(resolve_name(model, name))
        except AttributeError:
            problems.append(f"{name}: not a module of this {type(model).__name__}")
            continue
        problems += _shape_mismatches(model, sub, name, tensors)
    if problems:
        raise AdapterError(
            f"the NoRA adapter in {directory} does not fit this {type(model).__name__} (nothing was "
            f"changed): {'; '.join(problems[:6])}"
        )


def _built_activation(
    directory: Path,
    name: str,
    info: dict,
    config: NoraConfig,
    tensors: dict[str, torch.Tensor],
    original_module: nn.Module | None,
) -> NoraActivation:
    """Layer ``name``'s saved activation, loaded strictly; :class:`AdapterError` (the model untouched) when the file
    lacks one of its tensors, holds one of another shape, or its entry in the config is incomplete. A layer saved
    without ``residual`` predates the residual form: it was trained in the paper's form and loads so.
    ``original_module``: the activation it replaces (the residual form computes it)."""
    try:
        mod = NoraActivation(
            tensors[f"{name}.base_numerator"],
            tensors[f"{name}.base_denominator"],
            form=info["form"],
            backend=config.backend,
            original=info["original"],
            variant=info["variant"],
            r=info["r"],
            alpha=info["alpha"],
            numerator_mode=info["numerator_mode"],
            groups=info["groups"],
            fit_range=info.get("fit_range"),
            channel_dim=info.get("channel_dim", -1),
            width=info.get("width"),
            residual=bool(info.get("residual", False)),
            original_module=original_module,
        )
        mod.load_state_dict(
            {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}, strict=True
        )
    except KeyError as exc:
        raise AdapterError(
            f"the NoRA adapter in {directory} does not fit (nothing was changed): {name}: "
            f"{exc.args[0]} missing from {WEIGHTS_NAME if '.' in str(exc.args[0]) else CONFIG_NAME}"
        ) from None
    except (RuntimeError, TypeError, ValueError) as exc:
        why = " ".join(str(exc).split())[:300]
        raise AdapterError(
            f"the NoRA adapter in {directory} does not fit (nothing was changed): {name}: {why}"
        ) from None
    return mod


def load_nora(model: nn.Module, directory: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Load a saved NoRA adapter onto ``model`` (a fresh base model, peft-wrapped or not), in place.

    The whole adapter is checked against the model first (every saved activation exists with its saved
    width, every target of the saved config is covered, the ``trainable_modules`` tensors have the model's
    shapes): a mismatch raises :class:`AdapterError` and leaves the model untouched. Then the activations
    named in the file are replaced (no fitting: the saved coefficients are used) and every tensor is loaded
    strictly. The model is left frozen unless ``trainable=True``.
    """
    directory = Path(directory)
    meta = read_nora_config(directory)
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{directory}: unsupported NoRA adapter format {meta.get('format_version')}")
    try:
        config = NoraConfig.from_dict(meta["config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise AdapterError(f"{directory / CONFIG_NAME}: its config does not load ({exc})") from None
    tensors = _read_tensors(directory / WEIGHTS_NAME)
    _validate(model, directory, meta, tensors, config)
    device = next(iter(model.parameters())).device
    index = module_index(model)
    built = {
        name: _built_activation(
            directory, name, info, config, tensors, model.get_submodule(resolve_name(model, name, index))
        ).to(device)
        for name, info in meta["layers"].items()
    }  # all of them before the model changes
    for name, mod in built.items():
        set_module(model, resolve_name(model, name, index), mod)
    for name in meta["trainable_modules"]:
        sub = model.get_submodule(resolve_name(model, name, index))
        state = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        _load_canonical_state(model, sub, state)
    store_config(model, config)
    if trainable:
        set_trainable(model, config)
    else:
        model.requires_grad_(False)
    freeze_batchnorm_statistics(model)
    return model


def merge_nora(model: nn.Module) -> nn.Module:
    """Fold every NoRA update into plain per-group coefficients (frozen :class:`GroupRational`). A transformers model
    (not a peft one) becomes its ``Nora<class>`` (:func:`nora.adapter.merged.merged_class`): ``save_pretrained`` then
    writes a folder that loads with and without nora."""
    index = module_index(model)
    for name, mod in nora_modules(model).items():
        set_module(model, resolve_name(model, name, index), mod.merged())
    return as_merged_model(model)


def save_nora_pp(model: nn.Module, directory: str | os.PathLike) -> Path:
    """NoRA++: peft's LoRA/DoRA files and the NoRA adapter side by side in ``directory`` (peft's
    ``adapter_config.json`` marked so that peft alone refuses it; see the module docstring)."""
    if not is_peft_model(model):
        raise AdapterError("save_nora_pp expects a peft-wrapped model (LoRA/DoRA + NoRA)")
    model.save_pretrained(str(directory))
    return save_nora(model, directory)


def load_nora_pp(base_model: nn.Module, directory: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Rebuild a NoRA++ model: peft adapter from ``directory`` onto ``base_model``, then NoRA on top."""
    from peft import PeftConfig, PeftModel

    directory = Path(directory)
    read_nora_config(directory)  # both halves or nothing: fail before peft wraps the model
    _read_tensors(directory / WEIGHTS_NAME)  # a truncated or non-finite NoRA file too
    peft_config = PeftConfig.from_peft_type(**read_peft_config(directory))
    model = PeftModel.from_pretrained(base_model, str(directory), is_trainable=trainable, config=peft_config)
    load_nora(model, directory, trainable=trainable)
    if trainable:
        mark_trainable(model)
    return model


__all__ = [
    "save_nora",
    "load_nora",
    "merge_nora",
    "save_nora_pp",
    "load_nora_pp",
    "read_nora_config",
    "read_peft_config",
    "AdapterError",
    "GroupRational",
    "canonical_name",
]
