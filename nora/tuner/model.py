"""``NoraModel``: the peft tuner of method ``nora`` (NoRA, and NoRA++ with ``lora_r > 0``).

Injection visits the model once: an activation among the NoRA targets (``nora.find_targets`` with the config's NoRA
part) becomes a :class:`~nora.tuner.layer.NoraLayer`; a module among the LoRA targets (``lora_r > 0``) becomes peft's
own LoRA/DoRA layer, built by ``peft.LoraModel``'s code from the ``peft.LoraConfig`` the ``lora_*`` fields describe.
So one adapter (one name, one ``adapter_config.json``, one ``adapter_model.safetensors``) holds both parts, which is
what peft needs: it refuses to combine adapters of different types on one model.

Keys in ``adapter_model.safetensors`` (peft's: module name, peft's attribute, adapter name removed):
``<activation>.nora_activation.{base_numerator,base_denominator,nora_A_num,nora_B_num,nora_A_den,nora_B_den}``
(the base rational is saved: a calibrated fit cannot be recomputed at load time) and LoRA's usual
``<linear>.lora_A.weight``, ``<linear>.lora_B.weight`` (DoRA: ``<linear>.lora_magnitude_vector``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.tuners.tuners_utils import check_target_module_exists as peft_target_exists
from torch import nn

from nora.adapter import AdapterError
from nora.adapter.discover import PEFT_PREFIX, strip_peft
from nora.adapter.engine import RangeFits, calibrated_fits, module_device, plan_targets, set_module
from nora.adapter.io import parse_tensors
from nora.adapter.merged import as_merged_model
from nora.adapter.peft_format import CONFIG_FILE, LAYER_ATTR, WEIGHTS_FILE, nora_tensor, read_originals
from nora.adapter.validate import (
    check_finite,
    coefficient_problems,
    coverage_problems,
    layout_problems,
    listed,
    lora_target_problems,
    nonfinite,
    original_mismatch,
)
from nora.rational.fit import RationalFit
from nora.tuner.config import NoraPeftConfig
from nora.tuner.layer import NoraLayer

PREFIX = "nora_"


@contextlib.contextmanager
def bare_activations(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """Put each NoraLayer's own activation back in its place for the duration (target discovery and calibration
    see the model as it was); yields name -> that activation."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NoraLayer)}
    # the tuner copies peft_config onto the model it wraps, which makes nora's helpers take a bare transformers
    # model (whose `base_model` is its decoder) for a peft model and prefix names with base_model.model.
    hidden = {"peft_config": model.__dict__.pop("peft_config")} if "peft_config" in model.__dict__ else {}
    try:
        for name, layer in layers.items():
            set_module(model, name, layer.original_activation())
        yield {name: layer.original_activation() for name, layer in layers.items()}
    finally:
        for name, layer in layers.items():
            set_module(model, name, layer)
        model.__dict__.update(hidden)


class NoraModel(BaseTuner):
    """peft's tuner for ``NoraPeftConfig`` (see the module docstring). Built by ``peft.get_peft_model``."""

    prefix: str = PREFIX
    tuner_layer_cls = BaseTunerLayer  # NoraLayer and peft's LoraLayer
    target_module_mapping: dict = {}
    _create_new_module = staticmethod(LoraModel._create_new_module)

    # ---------------------------------------------------------------- injection
    def _state(self) -> dict:
        # plain attributes set before nn.Module.__init__ completes would be forwarded to the model; keep them here
        return self.__dict__.setdefault("_nora_state", {"targets": {}, "lora": {}, "fits": None})

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict=None,
    ) -> None:
        config: NoraPeftConfig = self.peft_config[adapter_name]
        state = self._state()
        with bare_activations(model):
            targets = state["targets"][adapter_name] = plan_targets(model, config.nora_config(), "NoraPeftConfig")
        lora = config.lora_config()
        lora_problems = _lora_target_problems(model, config) if lora is not None else []
        if lora_problems and not config.loaded:
            raise AdapterError(lora_problems[0])
        if lora is not None and not lora_problems:
            if lora.target_modules is None:
                lora = LoraModel._prepare_adapter_config(LoraModel, lora, self.get_model_config(model))
            lora = _maybe_include_all_linear_layers(lora, model)
        layouts = {n: t.layout for n, t in targets.items()}
        originals = {n: t.original for n, t in targets.items()}
        if config.loaded:  # peft's loader: the saved adapter against this model, before the model changes
            problems = lora_problems + _saved_problems(model, config, layouts, originals)
            problems += [] if lora_problems else _file_problems(model, config, originals, lora)
            if problems:
                where = config.source or "the saved NoRA adapter"
                raise AdapterError(
                    f"{where} does not fit this {type(model).__name__} (nothing was changed): "
                    + "; ".join(problems[:6])
                )
        if config.layer_specs is None or not config.loaded:
            config.layer_specs = {n: {**t.spec(), "init": "fit"} for n, t in targets.items()}
        state["lora"][adapter_name] = lora
        state["fits"] = RangeFits(config.nora_config())
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config  # NoRA's targets come from nora.find_targets, LoRA's from its LoraConfig

    def _check_target_module_exists(self, peft_config, key):
        adapter = next(a for a, c in self.peft_config.items() if c is peft_config)
        state = self._state()
        if key in state["targets"].get(adapter, ()):
            return True
        lora = state["lora"].get(adapter)
        return peft_target_exists(lora, key) if lora is not None else False

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, parameter_name=None
    ) -> None:
        target_spec = self._state()["targets"][adapter_name].get(current_key)
        if target_spec is not None:
            self._create_nora(peft_config, adapter_name, target, target_name, parent, target_spec)
        else:
            LoraModel._create_and_replace(
                self,
                self._state()["lora"][adapter_name],
                adapter_name,
                target,
                target_name,
                parent,
                current_key,
                parameter_name=parameter_name,
            )

    def _create_nora(
        self, config: NoraPeftConfig, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module, spec
    ) -> None:
        if isinstance(target, NoraLayer):
            layer = target
        else:
            layer = NoraLayer(target, spec.original)
            setattr(parent, target_name, layer)
        layer.update_layer(
            adapter_name,
            config.nora_config(),
            self._state()["fits"](spec),
            spec.layout,
            device=module_device(self.model),
            uncalibrated=config.init == "calibrated" and not config.loaded,
        )
        if adapter_name not in self.active_adapters:
            layer.nora_activation[adapter_name].requires_grad_(False)

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        """peft's merge_and_unload; a transformers model then becomes its ``Nora<class>`` (``save_pretrained`` writes a
        folder that loads with and without nora: :mod:`nora.adapter.merged`)."""
        return as_merged_model(super().merge_and_unload(*args, **kwargs))

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, NoraLayer):  # unloading an activation: no weight to carry over
            setattr(parent, child_name, new_module)
        else:
            LoraModel._replace_module(self, parent, child_name, new_module, child)

    # ---------------------------------------------------------------- saving (LoRA's DoRA key rename, kept)
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if not config.use_dora:
            return out
        suffix = f"lora_magnitude_vector.{adapter_name}.weight"  # peft's DoRA keys end without ".weight"
        return {(k[: -len(".weight")] if k.endswith(suffix) else k): v for k, v in out.items()}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """peft's key remapping, then every adapter tensor the model expects must be in the file and finite (peft
        itself only warns about missing keys and leaves those layers at their initialisation)."""
        state_dict = {(k + ".weight" if k.endswith("lora_magnitude_vector") else k): v for k, v in state_dict.items()}
        out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        where = (config.source / WEIGHTS_FILE) if getattr(config, "source", None) else WEIGHTS_FILE
        own = {k for k in model.state_dict() if _adapter_key(k, adapter_name)}
        prefix = "base_model.model."
        given = {k if k.startswith(prefix) or not any(o.startswith(prefix) for o in own) else prefix + k for k in out}
        missing = own - given
        if missing:
            raise AdapterError(
                f"{where}: {len(missing)} adapter tensor(s) this model needs are missing "
                f"({listed(missing)}); the file is incomplete or belongs to another model"
            )
        check_finite(out, where)
        return out


def _adapter_key(key: str, adapter_name: str) -> bool:
    return f".{LAYER_ATTR}.{adapter_name}." in key or (
        ".lora_" in key and (f".{adapter_name}." in key or key.endswith(f".{adapter_name}"))
    )


def _linear_names(model: nn.Module) -> list[str]:
    """The distinct last name segments of the layers LoRA can wrap (for a message)."""
    names = {
        n.rpartition(".")[2]
        for n, m in model.named_modules()
        if n and not list(m.children()) and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2
    }
    return sorted(names)


def _lora_target_problems(model: nn.Module, config: NoraPeftConfig) -> list[str]:
    """Each name of ``lora_target_modules`` (peft's rule: the full name or a suffix; a string: a regex in full) must
    match a module: peft's LoraConfig refuses a list none of whose names match; NoRA's activations always match
    something, so without this a typo would build NoRA alone."""
    targets = config.lora_target_modules
    try:
        missing = lora_target_problems((n for n, _ in model.named_modules()), targets)
    except ValueError as e:
        raise AdapterError(str(e)) from None
    if missing:
        return [
            f"lora_target_modules {missing} match no module of {type(model).__name__} (a name matches a module's "
            "full name or its last segments; a string is a regex matched in full); its weight layers are named "
            f"{', '.join(_linear_names(model)[:12])}"
        ]
    return []


def _saved_problems(model: nn.Module, config: NoraPeftConfig, layouts: dict, originals: dict[str, str]) -> list[str]:
    """The layers an adapter_config.json recorded (``layer_specs``) against this model's targets."""
    saved = config.layer_specs
    if saved is None:  # written before nora recorded them: the weights file is checked instead
        return []
    problems = coverage_problems(saved, layouts, type(model).__name__)
    for name in sorted(set(saved) & set(layouts)):
        spec = saved[name]
        mismatch = original_mismatch(name, originals[name], spec.get("original"))
        problems += [mismatch] if mismatch else layout_problems(layouts[name], name, {**spec, "groups": config.groups})
    return problems


def _file_problems(model: nn.Module, config: NoraPeftConfig, originals: dict[str, str], lora) -> list[str]:
    """The weights of the folder a loaded config came from (when local) against this model: finite, the NoRA layers
    the model's targets (for files without ``layer_specs``), their coefficient shapes, the LoRA modules."""
    if config.source is None:
        return []
    path, targets = config.source / WEIGHTS_FILE, set(originals)
    if not path.is_file():
        return []  # peft says where it looked
    tensors = parse_tensors(path, CONFIG_FILE)
    bad = nonfinite(tensors)
    if bad:
        return [f"{path}: {len(bad)} tensor(s) hold NaN or inf values ({listed(bad)})"]
    layers: dict[str, dict[str, torch.Tensor]] = {}
    lora_modules = set()
    for key, t in tensors.items():
        if (split := nora_tensor(key)) is not None:
            layers.setdefault(split[0], {})[split[1]] = t
        elif ".lora_" in key:
            lora_modules.add(key.removeprefix(PEFT_PREFIX).partition(".lora_")[0])
    if config.layer_specs is not None:
        differ = set(layers) ^ set(config.layer_specs)
        problems = (
            [f"{path}: its NoRA layers differ from the layer_specs of {CONFIG_FILE} ({listed(differ)})"]
            if differ
            else []
        )
    else:
        problems = [f"{path}: {p}" for p in coverage_problems(layers, targets, type(model).__name__)]
    if config.layer_specs is None:
        saved = read_originals(config.source)
        problems += [
            p for n, o in sorted(saved.items()) if n in targets and (p := original_mismatch(n, originals[n], o))
        ]
    for name in sorted(set(layers) & targets):
        problems += [
            f"{path}: {p}"
            for p in coefficient_problems(
                name,
                layers[name].get("base_numerator"),
                layers[name].get("base_denominator"),
                config.groups,
                config.degrees,
            )
        ]
    return problems + _lora_file_problems(model, config, lora, lora_modules, path)


def _lora_file_problems(
    model: nn.Module, config: NoraPeftConfig, lora, lora_modules: set[str], path: Path
) -> list[str]:
    if lora is None:
        return (
            [f"{path} holds LoRA tensors ({listed(lora_modules)}) but the config has lora_r=0"] if lora_modules else []
        )
    modules = dict(model.named_modules())
    unknown = sorted(m for m in lora_modules if strip_peft(m) not in modules and m not in modules)
    if unknown:
        return [f"{path} holds LoRA tensors of {listed(unknown)}, which are not modules of this {type(model).__name__}"]
    if config.target_parameters:  # fused expert tensors: peft's keys name parameters, not modules
        return []
    targeted = {n for n, m in modules.items() if n and not list(m.children()) and peft_target_exists(lora, n)}
    left = targeted - {strip_peft(m) for m in lora_modules}
    if left:
        return [
            f"{path} holds no LoRA tensors for {listed(left)} ({len(targeted)} LoRA targets in this "
            f"{type(model).__name__}, {len(lora_modules)} in the file)"
        ]
    return []


def nora_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, NoraLayer]:
    """Module name -> NoraLayer (holding ``adapter_name``, if given) of a peft model."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, NoraLayer) and (adapter_name is None or adapter_name in m.nora_activation)
    }


def calibrate(
    model: nn.Module, batches: Iterable, forward: Callable | None = None, adapter_name: str | None = None
) -> dict[str, RationalFit]:
    """NoRA's calibrated init on a peft model: record each NoRA activation's real inputs on ``batches`` (run
    through ``forward(model, batch)`` if given, with the model's own activations in place, as ``nora.apply_nora``
    does) and re-fit each adapter's base rational over them (per group with ``per_group_calibration``). Call it
    right after ``peft.get_peft_model`` (the update is still zero); returns name -> fit."""
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config[adapter_name]
    if not isinstance(config, NoraPeftConfig):
        raise AdapterError(f"adapter {adapter_name!r} is a {type(config).__name__}, not a NoraPeftConfig")
    layers = nora_layers(model, adapter_name)
    if not layers:
        raise AdapterError(f"adapter {adapter_name!r} holds no NoRA activation")
    dims = {n: layer.nora_activation[adapter_name].channel_dim for n, layer in layers.items()}
    with bare_activations(model) as originals:
        fits = calibrated_fits(model, config.nora_config(), {n: originals[n] for n in layers}, dims, batches, forward)
    for name, fit in fits.items():
        layers[name].set_base(adapter_name, fit)
        spec = (config.layer_specs or {}).get(strip_peft(name))
        if spec is not None:  # what the saved adapter_config.json says was done
            spec["init"] = "calibrated"
    return fits
