"""Save a merged NoRA model as a whole Hugging Face model that loads with or without nora.

``model.save_pretrained(dir)`` of a plain transformers class writes the rational coefficients into the checkpoint,
but ``AutoModelForCausalLM.from_pretrained(dir)`` would rebuild the model's own activation (SiLU, GELU) and drop them.
So a merged NoRA model is saved the way the ecosystem ships a new architecture::

    merged = nora.merge_nora(model)              # or peft's model.merge_and_unload() of a NoraPeftConfig adapter
    merged.save_pretrained("merged/")            # = nora.save_merged(merged, "merged/")
    model = nora.from_pretrained("merged/")      # with nora: its fused kernels
    model = AutoModelForCausalLM.from_pretrained("merged/", trust_remote_code=True)   # without nora

The folder (format 2) holds:

* ``config.json``: the base config with ``model_type`` ``nora_<base>`` (a type transformers does not know, so loading
  it without ``trust_remote_code`` fails with transformers' own error instead of silently building the original
  activations), ``auto_map`` naming the classes of ``modeling_nora.py``, and ``nora_merged``: the format version, the
  base model type and class, and per rational activation its groups, form, degrees, original activation, fit range,
  layout, whether it is in the residual form, and the shapes of its coefficient tensors;
* the checkpoint (``model.safetensors``), rational coefficients included (``<activation>.base_numerator`` ...; in the
  residual form also ``fit_numerator``/``fit_denominator``, the fit whose change is added to the original activation);
* ``modeling_nora.py``: the base class with those activations replaced by a plain-torch rational (the same math as
  :mod:`nora.rational.functional`), from ``nora/resources/modeling_nora.py.tmpl``.

Merging makes the model an instance of ``Nora<BaseClass>`` (a subclass of its own class made here: everything else is
unchanged), whose ``save_pretrained`` is :func:`save_merged`. Folders of format 1 (``nora_merged.json`` and
``nora_merged.safetensors`` beside a plain checkpoint) still load with :func:`from_pretrained`.
"""

from __future__ import annotations

import importlib.metadata
import os
import string
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from nora.adapter.config import AdapterError
from nora.adapter.inject import is_peft_model, nora_modules, set_module
from nora.adapter.layer import GroupRational
from nora.adapter.validate import check_finite, listed, nonfinite, not_an_activation, original_problem
from nora.files import read_json, write_json_atomic, write_text_atomic

MERGED_KEY = "nora_merged"  # the config.json entry (format 2)
MERGED_FORMAT_VERSION = 2
MODELING_FILE = "modeling_nora.py"
# format 1: beside a plain checkpoint
MERGED_CONFIG = "nora_merged.json"
MERGED_WEIGHTS = "nora_merged.safetensors"


def rational_modules(model: nn.Module) -> dict[str, GroupRational]:
    """Module name -> every rational activation of ``model`` (merged or not)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GroupRational)}


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """Module name -> what rebuilds that rational activation (``nora_merged["layers"]`` of a merged model's config)."""
    specs = {}
    for name, mod in rational_modules(model).items():
        if mod.residual and "fit_numerator" not in mod._buffers:
            raise AdapterError(
                f"{name} is in the residual form but holds no fit coefficients (fit_numerator, "
                "fit_denominator); merge it with nora.merge_nora"
            )
        specs[name] = {
            "groups": mod.groups,
            "form": mod.form,
            "degrees": list(mod.degrees),
            "original": mod.original,
            "fit_range": list(mod.fit_range) if mod.fit_range is not None else None,
            "channel_dim": mod.channel_dim,
            "width": mod.width,
            "residual": mod.residual,
            "shapes": {k: list(t.shape) for k, t in mod.state_dict().items()},
        }
    return specs


# ------------------------------------------------------------------------------- the merged model's class
_CLASSES: dict[type, type] = {}


def merged_class(base: type) -> type:
    """``Nora<base>``: ``base`` (a transformers model class) whose ``__init__`` puts rational activations where its
    ``config.nora_merged`` names them (empty coefficients, filled by the checkpoint) and whose ``save_pretrained``
    is :func:`save_merged`. One class per base, reachable as an attribute of this module (so it pickles)."""
    base = base_class(base)
    if base not in _CLASSES:
        name = f"Nora{base.__name__}"

        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            specs = (getattr(config, MERGED_KEY, None) or {}).get("layers", {})
            problems = spec_problems(self, specs)
            if problems:
                raise AdapterError(
                    f"config.json: {MERGED_KEY} does not fit this {base.__name__} (nothing was loaded): "
                    + "; ".join(problems[:4])
                )
            for layer, spec in specs.items():
                set_module(self, layer, _empty_rational(spec, self.get_submodule(layer)))

        def save_pretrained(self, save_directory, **kwargs):
            return save_merged(self, save_directory, **kwargs)

        cls = type(
            name,
            (base,),
            {
                "__init__": __init__,
                "save_pretrained": save_pretrained,
                "__module__": __name__,
                "__doc__": f"{base.__name__} with merged NoRA rational activations (nora).",
            },
        )
        cls.__qualname__ = name
        globals()[name] = _CLASSES[base] = cls
    return _CLASSES[base]


def __getattr__(name: str):
    """``Nora<X>`` for a transformers class ``X`` made on first access, so that a pickled merged model (``torch.save``)
    loads in a process that has not merged one."""
    if name.startswith("Nora") and len(name) > 4:
        try:
            import transformers

            base = getattr(transformers, name[4:], None)
        except ImportError:
            base = None
        if isinstance(base, type) and hasattr(base, "save_pretrained"):
            return merged_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def base_class(cls: type) -> type:
    """The transformers class under a ``Nora<base>`` class (``cls`` itself otherwise)."""
    return cls.__bases__[0] if cls in _CLASSES.values() else cls


def as_merged_model(model: nn.Module) -> nn.Module:
    """Make a merged transformers model (rational activations, no NoRA update left) an instance of its
    :func:`merged_class`, in place, so that its ``save_pretrained`` writes the self-contained folder. Other models are
    returned as they are."""
    if (
        is_peft_model(model)
        or nora_modules(model)
        or not rational_modules(model)
        or not hasattr(model, "save_pretrained")
        or not hasattr(model, "config")
    ):
        return model
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return model
    if isinstance(model, PreTrainedModel):
        model.__class__ = merged_class(type(model))
    return model


_SPEC_KEYS = ("groups", "form", "degrees", "original", "fit_range", "channel_dim", "width", "residual", "shapes")


def spec_problems(model: nn.Module, specs) -> list[str]:
    """The layers of a merged folder's ``nora_merged`` against the freshly built base ``model``: each names an
    activation module of the model (not a Linear, an MLP, a missing name), the activation it was fitted to, and
    coefficient shapes that agree with its groups and degrees."""
    if not isinstance(specs, dict):
        return [f"layers is a {type(specs).__name__}, not a dict of layer -> spec"]
    problems = []
    for name, spec in specs.items():
        why = _layer_problem(model, name, spec, _SPEC_KEYS, "spec")
        problems += [why] if why else _shape_problems(name, spec)
    return problems


def _layer_problem(model: nn.Module, name: str, entry, required, what: str) -> str | None:
    """What is wrong with one saved layer entry before anything else is read: a required key it lacks, a name that is
    no module of ``model``, a module that is no activation, an activation other than the one it was fitted to."""
    missing = [k for k in required if not isinstance(entry, dict) or k not in entry]
    if missing:
        return f"{name}: its {what} lacks {', '.join(missing)}"
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return f"{name}: not a module of this {type(model).__name__}"
    why = not_an_activation(module) or original_problem(name, module, entry["original"])
    if why:
        return why if why.startswith(name) else f"{name} {why}"
    return None


def _shape_problems(name: str, spec: dict) -> list[str]:
    shapes, (m, n), g = spec["shapes"], spec["degrees"], spec["groups"]
    want = {"base_numerator": [[g, m + 1], [1, m + 1]], "base_denominator": [[g, n]]}
    if spec["residual"]:
        want |= {"fit_numerator": [[g, m + 1]], "fit_denominator": [[g, n]]}
    bad = [
        f"{k} {shapes.get(k) if isinstance(shapes, dict) else None}"
        for k, ok in want.items()
        if not isinstance(shapes, dict) or list(shapes.get(k) or []) not in ok
    ]
    return [f"{name}: shapes {', '.join(bad)} disagree with groups={g}, degrees=[{m}, {n}]"] if bad else []


def _empty_rational(spec: dict, original: nn.Module) -> GroupRational:
    shapes = spec["shapes"]
    residual = bool(spec["residual"])
    return GroupRational(
        torch.zeros(shapes["base_numerator"]),
        torch.zeros(shapes["base_denominator"]),
        form=spec["form"],
        original=spec["original"],
        fit_range=spec["fit_range"],
        channel_dim=spec["channel_dim"],
        width=spec["width"],
        residual=residual,
        fit_numerator=torch.zeros(shapes["fit_numerator"]) if residual else None,
        fit_denominator=torch.zeros(shapes["fit_denominator"]) if residual else None,
        original_module=original,
    )


# ------------------------------------------------------------------------------- saving
def _auto_classes(model_type: str, architecture: str) -> list[str]:
    """The transformers Auto classes that build ``architecture`` for ``model_type`` (AutoModelForCausalLM, ...)."""
    import transformers

    names = []
    for name in dir(transformers):
        mapping = (
            getattr(getattr(transformers, name, None), "_model_mapping", None) if name.startswith("AutoModel") else None
        )
        got = getattr(mapping, "_model_mapping", {}).get(model_type) if mapping is not None else None
        if got == architecture or (isinstance(got, (tuple, list)) and architecture in got):
            names.append(name)
    return sorted(names)


def modeling_source(base: type, config_class: type, model_type: str) -> str:
    """``modeling_nora.py`` for ``base`` (:mod:`nora.resources`' template with the class names filled in)."""
    try:
        version = importlib.metadata.version("nora")
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    template = resources.files("nora.resources").joinpath("modeling_nora.py.tmpl").read_text()
    return string.Template(template).substitute(
        base_model=base.__name__,
        base_config=config_class.__name__,
        model_type=model_type,
        config_class=f"Nora{config_class.__name__}",
        model_class=f"Nora{base.__name__}",
        nora_version=version,
    )


def save_merged(model: nn.Module, directory: str | os.PathLike, **save_pretrained_kwargs) -> Path:
    """Save a merged NoRA transformers model as a folder that loads with nora (:func:`from_pretrained`) and without
    it (``AutoModel*.from_pretrained(directory, trust_remote_code=True)``); the module docstring has the layout."""
    if is_peft_model(model):
        raise AdapterError(
            "save_merged expects a plain model: fold peft's adapters in first "
            "(model = model.merge_and_unload()) and NoRA's with nora.merge_nora(model)"
        )
    if nora_modules(model):
        raise AdapterError("this model still holds trainable NoRA activations; call nora.merge_nora(model) first")
    if not rational_modules(model):
        raise AdapterError("this model holds no rational activations; save it with model.save_pretrained")
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise AdapterError(
            f"{type(model).__name__} has no save_pretrained (a Hugging Face model is expected); "
            "save its state_dict and the NoRA adapter (nora.save_nora before merging) instead"
        )
    import transformers

    base = base_class(type(model))
    if getattr(transformers, base.__name__, None) is not base:
        raise AdapterError(
            f"{base.__name__} is not a class transformers exports: a merged model is saved with its "
            "transformers class, which modeling_nora.py imports"
        )
    specs = layer_specs(model)
    directory = Path(directory)
    base_type = model.config.model_type
    if base_type.startswith("nora_"):  # a config read back from a merged folder keeps its base's type
        base_type = base_type[len("nora_") :]
    base.save_pretrained(model, str(directory), **save_pretrained_kwargs)
    for stale in (MERGED_CONFIG, MERGED_WEIGHTS):  # format 1 files of an earlier save to this folder
        (directory / stale).unlink(missing_ok=True)
    config_class = type(model.config)
    model_type = f"nora_{base_type}"
    auto = _auto_classes(base_type, base.__name__)
    if not auto:
        raise AdapterError(f"no transformers Auto class builds {base.__name__} for model type {base_type!r}")
    cfg = read_json(directory / "config.json")
    cfg.update(
        {
            "model_type": model_type,
            "architectures": [f"Nora{base.__name__}"],
            "auto_map": {
                "AutoConfig": f"modeling_nora.Nora{config_class.__name__}",
                **{a: f"modeling_nora.Nora{base.__name__}" for a in auto},
            },
            MERGED_KEY: {
                "format_version": MERGED_FORMAT_VERSION,
                "base_model_type": base_type,
                "base_architecture": base.__name__,
                "base_config_class": config_class.__name__,
                "layers": specs,
            },
        }
    )
    write_text_atomic(directory / MODELING_FILE, modeling_source(base, config_class, model_type))
    write_json_atomic(directory / "config.json", cfg)
    return directory


# ------------------------------------------------------------------------------- loading
def put_back_rationals(model: nn.Module, directory: str | os.PathLike, backend: str = "auto") -> nn.Module:
    """Format 1: replace the activations named in ``directory/nora_merged.json`` by the saved rationals, in place."""
    directory = Path(directory)
    meta = read_json(directory / MERGED_CONFIG)
    if not isinstance(meta, dict) or meta.get("format_version") != 1 or not isinstance(meta.get("layers"), dict):
        raise AdapterError(f"{directory}: no readable {MERGED_CONFIG} (write it with nora.save_merged)")
    path = directory / MERGED_WEIGHTS
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001  safetensors raises its own SafetensorError (and OSError, ValueError)
        raise AdapterError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); the file is "
            "missing, truncated or damaged"
        ) from None
    problems = _format1_problems(model, meta["layers"], tensors)
    if problems:
        raise AdapterError(
            f"{directory / MERGED_CONFIG} does not fit this {type(model).__name__} (nothing was "
            "changed): " + "; ".join(problems[:4])
        )
    check_finite(tensors, path)
    device = next(iter(model.parameters())).device
    for name, info in meta["layers"].items():
        residual = bool(info.get("residual", False))  # saved before the residual form: the paper's
        mod = GroupRational(
            tensors[f"{name}.base_numerator"],
            tensors[f"{name}.base_denominator"],
            form=info["form"],
            backend=backend,
            original=info["original"],
            fit_range=info["fit_range"],
            channel_dim=info.get("channel_dim", -1),
            width=info.get("width"),
            residual=residual,
            fit_numerator=tensors.get(f"{name}.fit_numerator") if residual else None,
            fit_denominator=tensors.get(f"{name}.fit_denominator") if residual else None,
            original_module=model.get_submodule(name),
        )
        set_module(model, name, mod.to(device))
    return model


def _format1_problems(model: nn.Module, layers: dict, tensors: dict) -> list[str]:
    """Format 1's layers against the model and the weights file, all before the model changes."""
    problems = []
    for name, info in layers.items():
        why = _layer_problem(model, name, info, ("form", "original", "fit_range"), "entry")
        if why:
            problems.append(why)
            continue
        keys = ["base_numerator", "base_denominator"] + (
            ["fit_numerator", "fit_denominator"] if info.get("residual") else []
        )
        absent = [k for k in keys if f"{name}.{k}" not in tensors]
        if absent:
            problems.append(f"{name}: {', '.join(absent)} missing from {MERGED_WEIGHTS}")
    return problems


def _concrete_class(model_class, config) -> type:
    """``model_class`` itself, or the class a transformers Auto class builds for ``config``."""
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:
        return model_class
    try:
        return mapping[type(config)]
    except KeyError:
        raise AdapterError(f"{model_class.__name__} builds no model for {type(config).__name__}") from None


def _check_parameters_finite(model: nn.Module, directory: Path, extra: dict | None = None) -> None:
    bad = nonfinite(extra or {}) + nonfinite(dict(model.named_parameters()))
    if bad:
        raise AdapterError(
            f"{directory}: {len(bad)} tensor(s) of the checkpoint hold NaN or inf values "
            f"({listed(bad)}); not loading a model that computes NaN"
        )


def from_pretrained(directory: str | os.PathLike, model_class=None, backend: str = "auto", **kwargs) -> nn.Module:
    """Load a merged model written by :func:`save_merged` with nora's rational activations (fused kernels):
    ``directory`` is a local folder; ``model_class`` is the class (or transformers Auto class) to build (default:
    the saved base class, format 1: ``AutoModelForCausalLM``); ``kwargs`` go to ``from_pretrained``."""
    directory = Path(directory)
    cfg = read_json(directory / "config.json") if (directory / "config.json").is_file() else None
    meta = cfg.get(MERGED_KEY) if isinstance(cfg, dict) else None
    if meta is None:
        if not (directory / MERGED_CONFIG).exists():
            raise AdapterError(
                f"{directory}: no merged NoRA model here (config.json has no {MERGED_KEY!r} and "
                f"there is no {MERGED_CONFIG}); nora.from_pretrained loads what nora.save_merged wrote "
                "(a plain model loads with its own from_pretrained)"
            )
        if model_class is None:
            from transformers import AutoModelForCausalLM as model_class
        model = model_class.from_pretrained(str(directory), **kwargs)
        _check_parameters_finite(model, directory)
        return as_merged_model(put_back_rationals(model, directory, backend))
    if not isinstance(meta, dict) or meta.get("format_version") != MERGED_FORMAT_VERSION:
        raise AdapterError(
            f"{directory / 'config.json'}: {MERGED_KEY} is not format {MERGED_FORMAT_VERSION} "
            f"(got {meta.get('format_version') if isinstance(meta, dict) else meta!r}); this nora reads "
            "formats 1 and 2"
        )
    import transformers
    from transformers import CONFIG_MAPPING

    base_type = meta["base_model_type"]
    if base_type not in CONFIG_MAPPING:
        raise AdapterError(
            f"{directory}: the base model type {base_type!r} is unknown to this transformers {transformers.__version__}"
        )
    config = CONFIG_MAPPING[base_type].from_dict(
        {k: v for k, v in cfg.items() if k not in ("model_type", "auto_map", "architectures")}
        | {"architectures": [meta["base_architecture"]]}
    )
    if model_class is None:
        model_class = getattr(transformers, meta["base_architecture"], None)
        if model_class is None:
            raise AdapterError(
                f"{directory}: transformers {transformers.__version__} has no class "
                f"{meta['base_architecture']!r} (the saved base class)"
            )
    want_info = kwargs.pop("output_loading_info", False)
    try:
        model, info = merged_class(_concrete_class(model_class, config)).from_pretrained(
            str(directory), config=config, output_loading_info=True, **kwargs
        )
    except AdapterError as exc:  # the layer specs, checked before the weights load
        raise AdapterError(str(exc).replace("config.json:", f"{directory / 'config.json'}:", 1)) from None
    rationals = rational_modules(model)
    missing = [k for k in info.get("missing_keys", ()) if k.rpartition(".")[0] in rationals]
    if missing:  # transformers would leave them at the empty (zero) coefficients with a warning
        raise AdapterError(
            f"{directory}: the checkpoint lacks {len(missing)} rational coefficient tensor(s) "
            f"({listed(missing)}) that config.json's {MERGED_KEY} names; copy the folder again or "
            "save it again with nora.save_merged"
        )
    _check_parameters_finite(
        model, directory, {f"{n}.{k}": t for n, mod in rationals.items() for k, t in mod.state_dict().items()}
    )
    for mod in rationals.values():
        mod.backend = backend
    return (model, info) if want_info else model
