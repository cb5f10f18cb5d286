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

import torch
from torch import nn

from nora.adapter.config import AdapterError, NoraConfig
from nora.adapter.discover import (
    KNOWN_ACTIVATIONS,
    Layout,
    activation_census,
    activation_layout,
    canonical_name,
    coverage,
    default_targets,
    inline_blocks,
    is_activation,
    is_identity,
    is_peft_model,
    is_rational,
    module_index,
    resolve_name,
)
from nora.adapter.layer import NoraActivation
from nora.adapter.ranges import watch_fit_range
from nora.rational.calibration import fit_to_inputs, record_inputs
from nora.rational.fit import RationalFit, fit_rational


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


def activation_target(module: nn.Module) -> tuple[str, Callable[[torch.Tensor], torch.Tensor] | str]:
    """The fitting target for an activation module: a known name, or the module itself."""
    cls = type(module).__name__
    if isinstance(module, nn.GELU):
        return ("gelu_tanh", "gelu_tanh") if module.approximate == "tanh" else ("gelu", "gelu")
    if cls in KNOWN_ACTIVATIONS:
        name = KNOWN_ACTIVATIONS[cls]
        return name, name

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x.float()).double()

    call.__name__ = cls
    return cls, call


def find_activations(model: nn.Module) -> list[str]:
    """Canonical names of every activation-looking module (for error messages and discovery)."""
    return [canonical_name(model, n) for n, m in model.named_modules() if is_activation(m)]


def describe_targets(config: NoraConfig) -> str:
    if config.target_modules is None:
        return "the default targets (known activations in feed-forward blocks)"
    return f"the targets {config.target_modules}"


def _not_an_activation(model: nn.Module, cname: str, mod: nn.Module) -> str | None:
    """Why the module ``cname`` cannot be an explicit target (a container, a placeholder, a layer with weights), or
    None."""
    cls = type(mod).__name__
    if len(list(mod.children())) > 0:
        return (
            f"target {cname!r} ({cls}) is not an activation: it has submodules; point target_modules at the "
            "activation itself"
        )
    if is_identity(mod):
        return (
            f"target {cname!r} is an nn.Identity placeholder, not an activation; narrow the pattern to real activations"
        )
    params = [f"{n} {tuple(p.shape)}" for n, p in mod.named_parameters(recurse=False)]
    if params:
        inline = cname in {n for names in inline_blocks(model).values() for n in names}
        why = (
            f"; {cls} computes its activation inline in forward, so NoRA cannot reach it"
            if inline
            else "; point target_modules at an activation module"
        )
        return f"target {cname!r} ({cls}) is not an activation: it holds parameters ({', '.join(params[:4])}){why}"
    return None


def _pattern_targets(model: nn.Module, patterns: list[str]) -> tuple[dict[str, nn.Module], list[str]]:
    compiled = [(p, re.compile(p)) for p in patterns]
    hits: dict[str, nn.Module] = {}
    matched = {p: 0 for p in patterns}
    for name, mod in model.named_modules():
        cname = canonical_name(model, name)
        if is_rational(mod) or not cname or cname in hits:
            continue
        for p, rx in compiled:
            if rx.fullmatch(cname):
                refused = _not_an_activation(model, cname, mod)
                if refused:
                    raise AdapterError(refused)
                hits[cname] = mod
                matched[p] += 1
                break
    return hits, [p for p, c in matched.items() if c == 0]


def describe_activations(model: nn.Module, config_name: str = "NoraConfig") -> str:
    """What an error says is there: the activation modules by type and count and the line that targets them, and
    the feed-forward blocks whose activation is computed inline (nothing to target)."""
    found, patterns = activation_census(model)
    inline = inline_blocks(model)
    parts = []
    if inline:
        blocks = ", ".join(
            f"{cls} x{len(names)} ({names[0]}{', ...' if len(names) > 1 else ''})" for cls, names in inline.items()
        )
        parts.append(
            f"NoRA cannot reach the feed-forward activations of {type(model).__name__}: {blocks} compute "
            "them inline in forward, with no activation module to replace"
        )
    if found:
        kinds = ", ".join(
            f"{cls} x{len(names)} ({names[0]}{', ...' if len(names) > 1 else ''})" for cls, names in found.items()
        )
        shown = ", ".join(f'r"{p}"' for p in patterns[:4]) + (", ..." if len(patterns) > 4 else "")
        parts.append(f"activation modules found: {kinds}; target them with {config_name}(target_modules=[{shown}])")
    elif not inline:
        parts.append("activation modules found: none")
    return "; ".join(parts)


def find_targets(model: nn.Module, config: NoraConfig, config_name: str = "NoraConfig") -> dict[str, nn.Module]:
    """Canonical name -> module for every target of ``config``.

    ``target_modules=None``: the default targets, every activation of a known kind inside a feed-forward
    block (see :mod:`nora.adapter.discover`); otherwise the modules whose canonical names match one of the
    regexes in full (never ``nn.Identity``, a container or a module with parameters). Raises
    :class:`AdapterError` if a pattern given explicitly matches nothing, or if nothing matches at all: the message
    lists the activation modules that are there, by type and count, with the ``config_name(target_modules=...)``
    line that names them, or says that the model computes its activation inline.
    """
    if config.target_modules is None:
        hits = default_targets(model)
    else:
        hits, missing = _pattern_targets(model, config.target_modules)
        if missing:
            raise AdapterError(
                f"target pattern(s) {missing} match no module of {type(model).__name__}; "
                + describe_activations(model, config_name)
            )
    if not hits:
        raise AdapterError(
            f"no activation of {type(model).__name__} matches {describe_targets(config)}; "
            + describe_activations(model, config_name)
        )
    return hits


def activation_width(model: nn.Module, name: str) -> int | None:
    """Channel width of the activation ``name`` if the layers around it tell it (see :func:`activation_layout`)."""
    return activation_layout(model, name).width


def check_layouts(model: nn.Module, names: Iterable[str], groups: int) -> dict[str, Layout]:
    """The layout of every target; raises if ``groups`` does not divide a width."""
    index = module_index(model)
    layouts = {name: activation_layout(model, name, index) for name in names}
    for name, lay in layouts.items():
        if lay.width is not None and lay.width % groups:
            raise ValueError(
                f"groups={groups} does not divide the width {lay.width} of {name} (read from "
                f"{lay.source}); choose a divisor of {lay.width}"
            )
    return layouts


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at the full (dotted) ``name`` of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _module_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


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
    targets = find_targets(model, config)
    layouts = check_layouts(model, targets, config.groups)
    originals = {name: activation_target(mod) for name, mod in targets.items()}
    fits = dict(fits or {})
    if config.init == "calibrated" and len(fits) < len(targets):
        fits.update(_calibrated_fits(model, config, targets, originals, layouts, fits, calibration_batches, forward))
    report = InjectionReport()
    range_fits: dict[str, RationalFit] = {}
    device = _module_device(model)
    index = module_index(model)
    for name in targets:
        oname, tgt = originals[name]
        fit = fits.get(name)
        if fit is None:
            key = oname if isinstance(tgt, str) else f"{oname}@{name}"
            if key not in range_fits:
                range_fits[key] = fit_rational(tgt, form=config.form, degrees=config.degrees, x_range=config.fit_range)
            fit = range_fits[key]
        num, den = _fit_tensors(fit)
        lay = layouts[name]
        new = NoraActivation(
            num,
            den,
            form=config.form,
            backend=config.backend,
            original=oname,
            variant=config.variant,
            r=config.r,
            alpha=config.alpha,
            numerator_mode=config.numerator,
            groups=config.groups,
            fit_range=(fit.x_min, fit.x_max),
            channel_dim=lay.channel_dim,
            width=lay.width,
            residual=config.residual,
            original_module=targets[name],
        ).to(device)
        if new.groups != config.groups:
            raise ValueError(f"{name}: fitted coefficients have {new.groups} groups, config says {config.groups}")
        set_module(model, resolve_name(model, name, index), new)
        report.targets[name] = {
            "original": oname,
            "max_error": fit.max_error,
            "rms_error": fit.rms_error,
            "range": [fit.x_min, fit.x_max],
            "width": lay.width,
            "channel_dim": lay.channel_dim,
        }
    report.layers, report.warnings, report.notes = coverage(model, list(targets))
    for w in report.warnings:
        warnings.warn(f"nora.apply_nora: {w}", UserWarning, stacklevel=2)
    store_config(model, config)
    set_trainable(model, config)
    if config.init == "fit" and not config.residual:  # the residual form is exact beyond the fit range too
        watch_fit_range(model, {n: originals[n][1] for n in targets}, calibration_batches, forward)
    return report


def _calibrated_fits(model, config, targets, originals, layouts, fits, calibration_batches, forward):
    if calibration_batches is None:
        raise ValueError("init='calibrated' needs calibration_batches (a few real input batches)")
    todo = {n: m for n, m in targets.items() if n not in fits}
    groups = {n: (config.groups if config.per_group_calibration else 1) for n in todo}
    dims = {n: layouts[n].channel_dim for n in todo}
    records = record_inputs(model, todo, groups, calibration_batches, forward, channel_dims=dims)
    out = {}
    for name, rec in records.items():
        tgt = originals[name][1]
        if config.per_group_calibration:
            per = [
                fit_to_inputs(
                    tgt, rec.values(g), config.form, config.degrees, config.calibration_range_weight, config.fit_range
                )
                for g in range(rec.groups)
            ]
            out[name] = _stack_fits(per)
        else:
            out[name] = fit_to_inputs(
                tgt, rec.values(), config.form, config.degrees, config.calibration_range_weight, config.fit_range
            )
    return out


def _fit_tensors(fit: RationalFit) -> tuple[torch.Tensor, torch.Tensor]:
    if "per_group" in fit.extra:
        return (torch.tensor(fit.extra["per_group"]["numerator"]), torch.tensor(fit.extra["per_group"]["denominator"]))
    num, den = fit.tensors()
    return num[None], den[None]


def _stack_fits(fits: list[RationalFit]) -> RationalFit:
    """Combine per-group fits into one record (errors: the worst group)."""
    worst = max(fits, key=lambda f: f.max_error)
    return RationalFit(
        numerator=fits[0].numerator,
        denominator=fits[0].denominator,
        form=worst.form,
        degrees=worst.degrees,
        max_error=worst.max_error,
        rms_error=max(f.rms_error for f in fits),
        x_min=min(f.x_min for f in fits),
        x_max=max(f.x_max for f in fits),
        target=worst.target,
        extra={"per_group": {"numerator": [f.numerator for f in fits], "denominator": [f.denominator for f in fits]}},
    )


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
