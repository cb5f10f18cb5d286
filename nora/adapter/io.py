"""Save only the adapter, load it onto a freshly built base model, merge it for inference.

:func:`save_nora` writes every NoRA adapter, alone or with LoRA/DoRA (NoRA++), vision or LM, in peft's layout
(:mod:`nora.adapter.peft_format`): ``adapter_config.json`` (``peft_type`` ``NORA``, the fields of
``nora.NoraPeftConfig`` with each activation's ``layer_specs``) and ``adapter_model.safetensors`` (the keys peft's
``NoraModel`` saves). NoRA alone needs no peft to write or read; ``peft.PeftModel.from_pretrained(base, dir)`` (after
``import nora``) reads the same folder where peft is installed. The LoRA part of a NoRA++ adapter is added by
:mod:`nora.tuner.convert` (registered with :func:`nora.adapter.peft_format.register_lora_part`).

:func:`load_nora` reads that layout and the two earlier ones, which nora no longer writes:

* ``nora_config.json`` + ``nora_adapter.safetensors``: NoRA alone (``format_version`` 1: the :class:`NoraConfig`, per
  activation its groups, form, degrees, width, layout, variant and original; tensors keyed by canonical module name);
* the two-part NoRA++: peft's LoRA/DoRA files next to those two, its ``adapter_config.json`` marked (the real
  ``peft_type`` under ``nora_peft_type``) so that peft alone refuses it.

NoRA alone loads in place without peft, after the whole adapter is checked against the model
(:mod:`nora.adapter.validate`); an adapter with a LoRA part loads through peft and returns the ``PeftModel``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields as dataclass_fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nora.adapter.config import AdapterError, NoraConfig
from nora.adapter.discover import (
    PEFT_PREFIX,
    activation_layout,
    canonical_name,
    is_peft_model,
    module_index,
    resolve_name,
    strip_peft,
)
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
from nora.adapter.peft_format import (
    LAYER_ATTR,
    PEFT_TYPE,
    config_json,
    lora_part,
    nora_tensor,
    read_originals,
    read_peft_nora_config,
)
from nora.adapter.validate import check_finite, saved_layer_problems
from nora.errors import MissingFileError
from nora.files import atomic_write, read_json, write_text_atomic

WEIGHTS_NAME = "nora_adapter.safetensors"
CONFIG_NAME = "nora_config.json"
FORMAT_VERSION = 1
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
FULL_FT_NAME = "trainable.safetensors"
# an adapter directory's files, by kind: the first of each names the kind (nora.app.adapters reads them)
PEFT_FILES = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)
NORA_FILES = (CONFIG_NAME, WEIGHTS_NAME)
_PEFT_KEYS = ("lora_", "modules_to_save.", "original_module.")


def canonical_state(model: nn.Module, module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` keyed by canonical names (peft's ``base_layer`` segments removed, peft's own
    adapter tensors left out: peft saves those), so it loads onto the module with or without LoRA."""
    out = {}
    for k, t in module.state_dict().items():
        if any(mark in k for mark in _PEFT_KEYS):
            continue
        out[strip_peft(k) if is_peft_model(model) else k] = t
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


def _check_save_directory(directory: Path) -> None:
    """Refuse to write into a directory of another adapter (it would later load as something else, or as both)."""
    if (directory / FULL_FT_NAME).exists():
        raise AdapterError(
            f"{directory} holds {FULL_FT_NAME} (a full fine-tuning / linear probe adapter); "
            "save the NoRA adapter into an empty directory"
        )
    if (directory / CONFIG_NAME).exists():
        raise AdapterError(
            f"{directory} holds {CONFIG_NAME} (a NoRA adapter in the earlier format); save into an empty directory"
        )
    if (directory / PEFT_CONFIG_NAME).exists() and read_peft_nora_config(directory) is None:
        raise AdapterError(
            f"{directory} holds peft adapter files ({PEFT_CONFIG_NAME}) of another method: NoRA would replace "
            "them; save into an empty directory (NoRA++: nora.save_nora on the peft-wrapped model writes both parts)"
        )


def _nora_part(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """The NoraPeftConfig fields of ``model``'s NoRA part (its NoraConfig, ``modules_to_save``: the
    ``trainable_modules``, ``layer_specs``) and its tensors under the keys peft's NoraModel saves."""
    config = get_nora_config(model)
    mods = nora_modules(model)
    if config is None or not mods:
        raise AdapterError("this model holds no NoRA activations; call nora.apply_nora first")
    peft_wrapped = is_peft_model(model)
    index = module_index(model)
    tensors: dict[str, torch.Tensor] = {}
    specs = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, NoraActivation):
            continue
        key = name if peft_wrapped else PEFT_PREFIX + name  # peft's keys: the real module paths
        for k, t in mod.state_dict().items():
            if k == "base_numerator":  # NoraLayer keeps one row per group (every adapter has the same shapes)
                t = t.expand(mod.groups, -1)
            tensors[f"{key}.{LAYER_ATTR}.{k}"] = t.detach().cpu().contiguous()
        cname = canonical_name(model, name)
        width = mod.width if mod.width is not None else activation_layout(model, cname, index).width
        specs[cname] = {"width": width, "channel_dim": mod.channel_dim, "original": mod.original, "init": config.init}
        if mod.fit_range is not None:  # the inputs its base was fitted over (calibrated: their hull), for merge/curves
            specs[cname]["fit_range"] = [float(v) for v in mod.fit_range]
    extra = trainable_module_names(model, config)
    for name in extra:  # saved as peft saves modules_to_save: by module name
        for k, t in canonical_state(model, model.get_submodule(resolve_name(model, name, index))).items():
            tensors[f"{PEFT_PREFIX}{name}.{k}"] = t.detach().cpu().contiguous()
    fields = {k: v for k, v in config.to_dict().items() if k != "trainable_modules"}
    fields.update(modules_to_save=extra or None, layer_specs=specs)
    return fields, tensors


def adapter_contents(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """The NoraPeftConfig fields and the tensors of ``model``'s NoRA adapter, with its LoRA/DoRA part on a
    peft-wrapped model (added by nora.tuner: :func:`nora.adapter.peft_format.register_lora_part`)."""
    fields, tensors = _nora_part(model)
    if is_peft_model(model):
        lora_fields, lora_tensors = lora_part(model, fields)
        fields, tensors = {**fields, **lora_fields}, {**lora_tensors, **tensors}
    return fields, tensors


def save_nora(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model``'s NoRA adapter (with its ``trainable_modules``, and on a peft-wrapped model its LoRA/DoRA part:
    NoRA++) to ``directory`` as one peft adapter of type ``NORA`` (see the module docstring); :func:`load_nora` and
    ``peft.PeftModel.from_pretrained`` read it. A model built by ``peft.get_peft_model(model, NoraPeftConfig(...))``
    is saved by peft itself."""
    directory = Path(directory)
    if is_peft_model(model) and str(getattr(model.peft_config.get(model.active_adapter), "peft_type", "")) == PEFT_TYPE:
        _check_save_directory(directory)
        model.save_pretrained(str(directory))
        return directory
    fields, tensors = adapter_contents(model)
    _check_save_directory(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # peft's own metadata and no more: safetensors orders a metadata map as it likes, and a run's adapter must be the
    # same bytes when it is written again (summary.json records its sha256); each layer's original is in layer_specs
    atomic_write(directory / PEFT_WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_text_atomic(directory / PEFT_CONFIG_NAME, config_json(fields))
    return directory


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


def parse_tensors(path: Path, beside: str = CONFIG_NAME) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file; :class:`AdapterError` naming it when it does not parse (truncated,
    overwritten); :class:`MissingFileError` when it is not there (next to ``beside``)."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise MissingFileError(f"{path} is missing (next to {beside})") from None
    except Exception as exc:  # noqa: BLE001  safetensors raises its own SafetensorError (and OSError, ValueError)
        raise AdapterError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); the file is "
            "truncated or damaged: copy the adapter again or retrain it"
        ) from None


def read_tensors(path: Path, beside: str = CONFIG_NAME) -> dict[str, torch.Tensor]:
    """:func:`parse_tensors`, and an :class:`AdapterError` naming the file when a tensor holds a NaN or inf (a
    diverged run saved by another tool)."""
    tensors = parse_tensors(path, beside)
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
    files: tuple[str, str] = NORA_FILES,
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
            f"{exc.args[0]} missing from {files[1] if '.' in str(exc.args[0]) else files[0]}"
        ) from None
    except (RuntimeError, TypeError, ValueError) as exc:
        why = " ".join(str(exc).split())[:300]
        raise AdapterError(
            f"the NoRA adapter in {directory} does not fit (nothing was changed): {name}: {why}"
        ) from None
    return mod


def _legacy_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor], NoraConfig]:
    """``nora_config.json`` + ``nora_adapter.safetensors`` (the earlier format): what the loader needs."""
    meta = read_nora_config(directory)
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{directory}: unsupported NoRA adapter format {meta.get('format_version')}")
    try:
        config = NoraConfig.from_dict(meta["config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise AdapterError(f"{directory / CONFIG_NAME}: its config does not load ({exc})") from None
    return meta, read_tensors(directory / WEIGHTS_NAME), config


_SPEC_KEYS = ("width", "channel_dim", "original", "fit_range")  # what the loader reads of a layer_specs entry


def _peft_layout_adapter(directory: Path, cfg: dict) -> tuple[dict, dict[str, torch.Tensor], NoraConfig]:
    """A NoRA peft adapter without a LoRA part, read without peft, as the loader's ``meta`` (per layer what the
    earlier format recorded) and tensors keyed by canonical names (``<activation>.<tensor>``, ``<module>.<tensor>``)."""
    path = directory / PEFT_WEIGHTS_NAME
    raw = read_tensors(path, beside=PEFT_CONFIG_NAME)
    tensors: dict[str, torch.Tensor] = {}
    layers: set[str] = set()
    for key, t in raw.items():
        if ".lora_" in key:
            raise AdapterError(f"{path} holds LoRA tensors ({key}), but {PEFT_CONFIG_NAME} says lora_r=0")
        split = nora_tensor(key)
        if split is not None:
            layers.add(split[0])
            tensors[".".join(split)] = t
        else:
            tensors[strip_peft(key)] = t
    specs = cfg.get("layer_specs") if isinstance(cfg.get("layer_specs"), dict) else None
    if specs is not None and set(specs) != layers:
        raise AdapterError(
            f"{path}: its NoRA layers differ from the layer_specs of {PEFT_CONFIG_NAME} "
            f"({sorted(set(specs) ^ layers)[:4]}); the folder mixes two adapters: copy it again or retrain it"
        )
    names = {f.name for f in dataclass_fields(NoraConfig)} - {"trainable_modules"}
    kept = cfg.get("modules_to_save") or []
    try:
        config = NoraConfig.from_dict(
            {**{k: v for k, v in cfg.items() if k in names}, "trainable_modules": [re.escape(m) for m in kept]}
        )
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{directory / PEFT_CONFIG_NAME}: its NoRA config does not load ({exc})") from None
    # each layer's original is in its layer_specs entry (recorded, below); only an adapter written before nora recorded
    # them keeps it in the weights file's metadata
    originals = read_originals(directory) if specs is None else {}
    recorded = {
        name: {k: v for k, v in spec.items() if k in _SPEC_KEYS}
        for name, spec in (specs or {}).items()
        if isinstance(spec, dict)
    }
    layer_info = {
        "groups": config.groups,
        "form": config.form,
        "variant": config.variant,
        "r": config.r,
        "alpha": config.alpha,
        "numerator_mode": config.numerator,
        "fit_range": list(config.fit_range),
        "residual": config.residual,
    }
    meta = {
        "layers": {
            name: {**layer_info, "original": originals.get(name), **recorded.get(name, {})} for name in sorted(layers)
        },
        "trainable_modules": list(kept),
    }
    return meta, tensors, config


def _load_with_peft(model: nn.Module, directory: Path, trainable: bool) -> nn.Module:
    """A NoRA++ adapter (LoRA/DoRA + NoRA) through peft: one NORA peft adapter, or the earlier two-part format."""
    try:
        from peft import PeftConfig, PeftModel
    except ImportError as exc:
        raise AdapterError(
            f"{directory} holds a NoRA++ adapter (a LoRA/DoRA part next to NoRA), which loads through peft: "
            f"install peft (pip install peft) ({exc})"
        ) from None
    if read_peft_nora_config(directory) is not None:  # the tuner checks it against the model before any change
        return PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
    meta, tensors, config = _legacy_adapter(directory)  # both halves or nothing: fail before peft wraps the model
    peft_config = PeftConfig.from_peft_type(**read_peft_config(directory))
    wrapped = PeftModel.from_pretrained(model, str(directory), is_trainable=trainable, config=peft_config)
    _load_in_place(wrapped, directory, meta, tensors, config, trainable, NORA_FILES)
    if trainable:
        mark_trainable(wrapped)
    return wrapped


def load_nora(model: nn.Module, directory: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Load the NoRA adapter in ``directory`` onto ``model`` (a freshly built base model); returns the model.

    NoRA alone (:func:`save_nora`'s peft layout, or the earlier ``nora_config.json`` format) loads in place, without
    peft: the whole adapter is checked against the model first (every saved activation exists with its saved width,
    layout and original activation, every target of the saved config is covered, every tensor is finite, the
    ``trainable_modules`` tensors have the model's shapes): a mismatch raises :class:`AdapterError` and leaves the
    model untouched. Then the activations named in the file are replaced (no fitting: the saved coefficients are used)
    and every tensor is loaded strictly. An adapter with a LoRA/DoRA part (NoRA++, either format) loads through peft
    (``peft.PeftModel.from_pretrained``, whose NORA tuner runs the same checks) and the ``PeftModel`` is returned.
    The model is left frozen unless ``trainable=True``.
    """
    directory = Path(directory)
    cfg = read_peft_nora_config(directory)
    if cfg is not None:
        if cfg.get("lora_r"):
            return _load_with_peft(model, directory, trainable)
        meta, tensors, config = _peft_layout_adapter(directory, cfg)
        files = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)
    elif "nora_peft_type" in (read_json(directory / PEFT_CONFIG_NAME) or {}):
        return _load_with_peft(model, directory, trainable)  # the earlier two-part NoRA++
    elif (directory / CONFIG_NAME).exists():
        meta, tensors, config = _legacy_adapter(directory)
        files = NORA_FILES
    else:
        raise MissingFileError(
            f"no NoRA adapter at {directory} (expected {PEFT_CONFIG_NAME} with peft_type {PEFT_TYPE} and "
            f"{PEFT_WEIGHTS_NAME}, or the earlier {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    return _load_in_place(model, directory, meta, tensors, config, trainable, files)


def _load_in_place(
    model: nn.Module,
    directory: Path,
    meta: dict,
    tensors: dict[str, torch.Tensor],
    config: NoraConfig,
    trainable: bool,
    files: tuple[str, str],
) -> nn.Module:
    _validate(model, directory, meta, tensors, config)
    device = next(iter(model.parameters())).device
    index = module_index(model)
    built = {
        name: _built_activation(
            directory, name, info, config, tensors, model.get_submodule(resolve_name(model, name, index)), files
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


__all__ = [
    "save_nora",
    "load_nora",
    "merge_nora",
    "adapter_contents",
    "read_nora_config",
    "read_peft_config",
    "read_tensors",
    "AdapterError",
    "GroupRational",
    "canonical_name",
]
