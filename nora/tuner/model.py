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
from typing import Callable, Iterable, Iterator

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.tuners.tuners_utils import check_target_module_exists as peft_target_exists
from torch import nn

from nora.adapter import AdapterError, find_targets
from nora.adapter.discover import activation_layout
from nora.adapter.inject import activation_target, set_module
from nora.adapter.merged import as_merged_model
from nora.rational.calibration import fit_to_inputs, record_inputs
from nora.rational.fit import RationalFit, fit_rational
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


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class NoraModel(BaseTuner):
    """peft's tuner for ``NoraPeftConfig`` (see the module docstring). Built by ``peft.get_peft_model``."""

    prefix: str = PREFIX
    tuner_layer_cls = BaseTunerLayer  # NoraLayer and peft's LoraLayer
    target_module_mapping: dict = {}
    _create_new_module = staticmethod(LoraModel._create_new_module)

    # ---------------------------------------------------------------- injection
    def _state(self) -> dict:
        # plain attributes set before nn.Module.__init__ completes would be forwarded to the model; keep them here
        return self.__dict__.setdefault("_nora_state", {"targets": {}, "layouts": {}, "lora": {}, "fits": {}})

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        config: NoraPeftConfig = self.peft_config[adapter_name]
        state = self._state()
        with bare_activations(model):
            try:
                state["targets"][adapter_name] = set(find_targets(model, config.nora_config(), "NoraPeftConfig"))
            except ValueError as e:
                raise AdapterError(str(e)) from e
            layouts = state["layouts"][adapter_name] = {n: activation_layout(model, n)
                                                        for n in state["targets"][adapter_name]}
        for name, layout in layouts.items():
            if layout.width is not None and layout.width % config.groups:
                raise AdapterError(f"groups={config.groups} does not divide the width {layout.width} of {name}; "
                                   f"choose a divisor of {layout.width}")
        lora = config.lora_config()
        if lora is not None:
            if lora.target_modules is None:
                lora = LoraModel._prepare_adapter_config(LoraModel, lora, self.get_model_config(model))
            lora = _maybe_include_all_linear_layers(lora, model)
        state["lora"][adapter_name] = lora
        state["fits"] = {}
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config  # NoRA's targets come from nora.find_targets, LoRA's from its LoraConfig

    def _check_target_module_exists(self, peft_config, key):
        adapter = next(a for a, c in self.peft_config.items() if c is peft_config)
        state = self._state()
        if key in state["targets"].get(adapter, ()):
            return True
        lora = state["lora"].get(adapter)
        return peft_target_exists(lora, key) if lora is not None else False

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key,
                            parameter_name=None) -> None:
        if current_key in self._state()["targets"][adapter_name]:
            layout = self._state()["layouts"][adapter_name][current_key]
            self._create_nora(peft_config, adapter_name, target, target_name, parent, layout)
        else:
            LoraModel._create_and_replace(self, self._state()["lora"][adapter_name], adapter_name, target,
                                          target_name, parent, current_key, parameter_name=parameter_name)

    def _fit(self, config: NoraPeftConfig, activation: nn.Module, name: str) -> tuple[str, RationalFit]:
        """The range fit of ``activation`` (one per distinct activation and config; fit_rational caches on disk)."""
        original, target = activation_target(activation)
        key = (original if isinstance(target, str) else f"{original}@{name}", config.form, tuple(config.degrees),
               tuple(config.fit_range))
        fits = self._state()["fits"]
        if key not in fits:
            fits[key] = fit_rational(target, form=config.form, degrees=tuple(config.degrees),
                                     x_range=tuple(config.fit_range))
        return original, fits[key]

    def _create_nora(self, config: NoraPeftConfig, adapter_name: str, target: nn.Module, target_name: str,
                     parent: nn.Module, layout) -> None:
        activation = target.original_activation() if isinstance(target, NoraLayer) else target
        original, fit = self._fit(config, activation, target_name)
        if isinstance(target, NoraLayer):
            layer = target
        else:
            layer = NoraLayer(target, original)
            setattr(parent, target_name, layer)
        layer.update_layer(adapter_name, config.nora_config(), fit, device=_device(self.model),
                           channel_dim=layout.channel_dim, width=layout.width)
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
        return {(k[:-len(".weight")] if k.endswith(suffix) else k): v for k, v in out.items()}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = {(k + ".weight" if k.endswith("lora_magnitude_vector") else k): v for k, v in state_dict.items()}
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def nora_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, NoraLayer]:
    """Module name -> NoraLayer (holding ``adapter_name``, if given) of a peft model."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, NoraLayer) and (adapter_name is None or adapter_name in m.nora_activation)}


def calibrate(model: nn.Module, batches: Iterable, forward: Callable | None = None,
              adapter_name: str | None = None) -> dict[str, RationalFit]:
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
    groups = {n: (config.groups if config.per_group_calibration else 1) for n in layers}
    dims = {n: layer.nora_activation[adapter_name].channel_dim for n, layer in layers.items()}
    with bare_activations(model) as originals:
        records = record_inputs(model, {n: originals[n] for n in layers}, groups, batches, forward, channel_dims=dims)
    fits = {}
    for name, rec in records.items():
        target = activation_target(layers[name].original_activation())[1]
        per = [fit_to_inputs(target, rec.values(g) if config.per_group_calibration else rec.values(), config.form,
                             tuple(config.degrees), config.calibration_range_weight, tuple(config.fit_range))
               for g in range(groups[name])]
        fit = per[0] if len(per) == 1 else RationalFit(
            numerator=per[0].numerator, denominator=per[0].denominator, form=config.form,
            degrees=tuple(config.degrees), max_error=max(f.max_error for f in per),
            rms_error=max(f.rms_error for f in per), x_min=min(f.x_min for f in per),
            x_max=max(f.x_max for f in per), target=per[0].target,
            extra={"per_group": {"numerator": [f.numerator for f in per],
                                 "denominator": [f.denominator for f in per]}})
        layers[name].set_base(adapter_name, fit)
        fits[name] = fit
    return fits
