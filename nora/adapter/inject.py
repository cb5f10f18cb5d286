"""Find a model's activations, replace them with NoRA activations, and set what trains.

Works on any ``nn.Module``: timm and Hugging Face models of every MLP layout (dense, gated, fused ``gate_up``,
conv-layout, MoE experts; the default targets are found by kind, see :mod:`nora.adapter.discover`), and models
wrapped by peft (NoRA++), whose module names are used in their canonical (unwrapped) form.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from torch import nn

from nora.adapter.config import AdapterError, NoraConfig
from nora.adapter.discover import canonical_name, coverage, is_peft_model, module_index, resolve_name
from nora.adapter.engine import (  # the engine's steps, also importable from here
    RangeFits,
    activation_target,
    build_activation,
    calibrated_fits,
    describe_targets,
    find_activations,
    find_targets,
    module_device,
    plan_targets,
    set_module,
    swap,
)
from nora.adapter.layer import NoraActivation
from nora.adapter.ranges import watch_fit_range
from nora.rational.fit import RationalFit

__all__ = [
    "InjectionReport",
    "activation_target",
    "apply_nora",
    "canonical_name",
    "describe_targets",
    "disable_adapter",
    "find_activations",
    "find_targets",
    "freeze_batchnorm_statistics",
    "get_nora_config",
    "get_peft_model",
    "is_peft_model",
    "mark_trainable",
    "nora_modules",
    "resolve_name",
    "set_module",
    "set_trainable",
    "store_config",
    "trainable_module_names",
]


@dataclass
class InjectionReport:
    """What ``apply_nora`` replaced and how well each base rational matches the original.

    ``layers``: per layer type (the model's repeated blocks), how many layers it has, how many hold a target
    and how many targets; ``warnings``: layer types only partly covered (also issued as ``UserWarning``);
    ``notes``: layer types without any target (e.g. a MobileViT's convolution blocks)."""

    targets: dict[str, dict] = field(default_factory=dict)  # name -> {original, max_error, rms_error, range, ...}
    layers: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def max_error(self) -> float:
        return max((t["max_error"] for t in self.targets.values()), default=0.0)

    def __len__(self) -> int:
        return len(self.targets)

    def summary(self) -> str:
        """One line per layer type and per original activation, then the warnings and notes."""
        lines = [f"{len(self.targets)} activations replaced, max fit error {self.max_error():.3g}"]
        for kind, row in self.layers.items():
            if row["with_targets"]:
                lines.append(f"  {kind}: {row['targets']} in {row['with_targets']} of {row['layers']} layers")
        originals: dict[str, int] = {}
        for t in self.targets.values():
            originals[t["original"]] = originals.get(t["original"], 0) + 1
        lines.append("  originals: " + ", ".join(f"{k} x{v}" for k, v in sorted(originals.items())))
        return "\n".join(lines + [f"  warning: {w}" for w in self.warnings] + [f"  note: {n}" for n in self.notes])


def apply_nora(
    model: nn.Module,
    config: NoraConfig | None = None,
    calibration_batches: Iterable | None = None,
    forward: Callable | None = None,
    fits: dict[str, RationalFit] | None = None,
) -> InjectionReport:
    """Replace the target activations of ``model`` in place and mark what trains.

    * Targets: by default every activation of a known kind inside a feed-forward block (dense, gated,
      every expert and shared expert of an MoE, in every layer; see :mod:`nora.adapter.discover`), or the
      modules ``config.target_modules`` names. The width each one sees and its channel dimension
      (channels last, or dim 1 for conv-layout MLPs) are read from the layers around it and checked
      against ``config.groups`` here.
    * ``init="fit"`` fits each distinct original activation once over ``config.fit_range``;
      ``init="calibrated"`` records each target's inputs on ``calibration_batches`` (run through
      ``forward(model, batch)`` if given) and fits each layer over its own inputs. With ``init="fit"``,
      calibration batches (if given) or else the first batch the model sees are checked against the fit
      range, with one warning if inputs fall outside it.
    * ``fits`` (canonical name -> RationalFit) overrides fitting for those targets.
    * Trainable set: on a plain model everything is frozen except the NoRA parameters and
      ``config.trainable_modules``; on a peft model the adapters peft marked stay as they are and
      the NoRA parameters (and ``trainable_modules``) are added, so NoRA++ trains exactly LoRA's plus NoRA's
      parameters. BatchNorm running statistics of frozen BatchNorm layers are frozen too (momentum 0), so
      a saved adapter reloads to the same outputs.

    Returns an :class:`InjectionReport`; the config is stored as ``model.nora_config``.
    """
    config = config or NoraConfig()
    if nora_modules(model):
        raise AdapterError(
            f"this {type(model).__name__} already holds NoRA activations "
            f"({', '.join(list(nora_modules(model))[:2])}, ...); apply_nora once per model "
            "(nora.merge_nora folds a trained one into plain rationals)"
        )
    targets = plan_targets(model, config)
    fits = dict(fits or {})
    if config.init == "calibrated" and len(fits) < len(targets):
        todo = {n: t for n, t in targets.items() if n not in fits}
        modules = {n: t.module for n, t in todo.items()}
        dims = {n: t.layout.channel_dim for n, t in todo.items()}
        fits.update(calibrated_fits(model, config, modules, dims, calibration_batches, forward))
    range_fit = RangeFits(config)
    report = InjectionReport()
    device = module_device(model)
    index = module_index(model)
    for name, target in targets.items():
        fit = fits.get(name) or range_fit(target)
        new = build_activation(config, fit, target.original, target.module, target.layout, device)
        swap(model, name, new, index)
        report.targets[name] = {
            "original": target.original,
            "max_error": fit.max_error,
            "rms_error": fit.rms_error,
            "range": [fit.x_min, fit.x_max],
            "width": target.layout.width,
            "channel_dim": target.layout.channel_dim,
        }
    report.layers, report.warnings, report.notes = coverage(model, list(targets))
    for w in report.warnings:
        warnings.warn(f"nora.apply_nora: {w}", UserWarning, stacklevel=2)
    store_config(model, config)
    set_trainable(model, config)
    if config.init == "fit" and not config.residual:  # the residual form is exact beyond the fit range too
        watch_fit_range(model, {n: t.function for n, t in targets.items()}, calibration_batches, forward)
    return report


def store_config(model: nn.Module, config: NoraConfig) -> None:
    """Remember ``config`` on the (unwrapped) model and let peft's ``disable_adapter()`` switch NoRA off too."""
    base = model.get_base_model() if is_peft_model(model) else model
    base.nora_config = config
    if is_peft_model(model):
        follow_peft_adapter_switch(model)


def _enable_tuner_and_nora(tuner: nn.Module, enabled: bool = True) -> None:
    type(tuner)._enable_adapter_layers(tuner, enabled=enabled)
    for mod in tuner.modules():
        if isinstance(mod, NoraActivation):
            mod.adapter_enabled = enabled


def follow_peft_adapter_switch(model: nn.Module) -> None:
    """Make peft's ``disable_adapter()`` / ``disable_adapter_layers()`` switch the NoRA updates off as well.

    peft only toggles its own tuner layers (``BaseTunerLayer``), all through the tuner's
    ``_enable_adapter_layers``; this routes that one method through :func:`_enable_tuner_and_nora` for this
    tuner instance. A ``functools.partial`` bound to the tuner (not a closure over ``model``) so that a
    ``copy.deepcopy`` of the model, e.g. a DPO reference model, toggles its own copy.
    """
    tuner = model.base_model
    if hasattr(type(tuner), "_enable_adapter_layers"):
        tuner._enable_adapter_layers = functools.partial(_enable_tuner_and_nora, tuner)


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` without its NoRA updates (and, on a peft model, without its LoRA/DoRA adapters)::

        with nora.disable_adapter(model):
            reference_logits = model(ids).logits

    Disabled NoRA activations compute what they computed at step 0 of training: in the residual form (the default)
    the original activation itself, so the pretrained model; in the paper's form the frozen *base rational* (the
    fit of the original activation). That is the model NoRA training started from, which is what a DPO/KL
    reference model needs. peft's own ``model.disable_adapter()`` does the same on a NoRA++ model.
    """
    if is_peft_model(model):
        with model.disable_adapter():
            yield model
        return
    mods = list(nora_modules(model).values())
    before = [m.adapter_enabled for m in mods]
    try:
        for m in mods:
            m.adapter_enabled = False
        yield model
    finally:
        for m, state in zip(mods, before):
            m.adapter_enabled = state


def get_nora_config(model: nn.Module) -> NoraConfig | None:
    base = model.get_base_model() if is_peft_model(model) else model
    return getattr(base, "nora_config", None)


def nora_modules(model: nn.Module) -> dict[str, NoraActivation]:
    """Canonical name -> NoRA activation module."""
    return {canonical_name(model, n): m for n, m in model.named_modules() if isinstance(m, NoraActivation)}


def _match_trainable(model: nn.Module, patterns: list[str]) -> dict[str, nn.Module]:
    """Canonical name -> module for ``trainable_modules``; raises on a pattern that matches nothing."""
    rx = [re.compile(p) for p in patterns]
    hit = {p: 0 for p in patterns}
    found: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        cname = canonical_name(model, name)
        for r in rx:
            if cname and r.fullmatch(cname):
                hit[r.pattern] += 1
                found.setdefault(cname, mod)
    missing = [p for p, c in hit.items() if c == 0]
    if missing:
        raise ValueError(f"trainable_modules {missing} match no module of {type(model).__name__}")
    if is_peft_model(model):
        wrapped = [n for n, m in found.items() if hasattr(m, "modules_to_save")]
        if wrapped:
            raise ValueError(
                f"trainable_modules {wrapped} are already in peft's modules_to_save; list them in one of the two"
            )
    return found


def trainable_module_names(model: nn.Module, config: NoraConfig) -> list[str]:
    """Canonical names of the modules ``config.trainable_modules`` makes trainable."""
    return list(_match_trainable(model, config.trainable_modules)) if config.trainable_modules else []


def set_trainable(model: nn.Module, config: NoraConfig | None = None) -> None:
    """Freeze the base model and enable NoRA (+ ``trainable_modules``); see :func:`apply_nora`.

    On a peft model what peft marked stays as it is and ``trainable_modules`` are added (an unknown name
    raises, as on a plain model)."""
    config = config or get_nora_config(model) or NoraConfig()
    found = _match_trainable(model, config.trainable_modules)
    if not is_peft_model(model):
        for p in model.parameters():
            p.requires_grad_(False)
    for mod in found.values():
        for p in mod.parameters():
            p.requires_grad_(True)
    mark_trainable(model)
    freeze_batchnorm_statistics(model)


def freeze_batchnorm_statistics(model: nn.Module) -> list[str]:
    """Stop the running statistics of every BatchNorm whose parameters are frozen from moving in train mode
    (momentum 0: train mode still normalises with the batch's statistics, the running ones stay as loaded), so
    that an adapter saved after training reloads onto a fresh model with the same outputs. A BatchNorm in
    ``trainable_modules`` keeps its momentum; its statistics are saved with the adapter."""
    frozen = []
    for name, mod in model.named_modules():
        if (
            isinstance(mod, nn.modules.batchnorm._BatchNorm)
            and mod.track_running_stats
            and not any(p.requires_grad for p in mod.parameters())
        ):
            if mod.momentum != 0.0:
                mod.nora_momentum = mod.momentum  # the original value, for reference
                mod.momentum = 0.0
            frozen.append(canonical_name(model, name))
    return frozen


def mark_trainable(model: nn.Module) -> None:
    """(Re-)enable the NoRA parameters, e.g. after ``peft.get_peft_model`` froze them."""
    for mod in nora_modules(model).values():
        for p in mod.parameters(recurse=False):
            p.requires_grad_(True)


def get_peft_model(model: nn.Module, peft_config, **kwargs):
    """``peft.get_peft_model`` for a model that already holds NoRA activations (NoRA first, then LoRA).

    peft freezes every parameter that is not its own; this re-enables NoRA's so the trainable set is
    exactly LoRA's plus NoRA's, as when NoRA is applied after peft.
    """
    import peft

    wrapped = peft.get_peft_model(model, peft_config, **kwargs)
    mark_trainable(wrapped)
    follow_peft_adapter_switch(wrapped)
    return wrapped
