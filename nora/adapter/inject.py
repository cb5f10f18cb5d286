"""Find a model's activations, replace them with NoRA activations, and set what trains.

Works on any ``nn.Module``: timm ViTs (``blocks.N.mlp.act``, an ``nn.GELU``), Hugging Face decoder
LMs whose MLP calls ``act_fn`` (LLaMA, Qwen2, Mistral, ...), and models wrapped by peft (NoRA++).
"""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from nora.adapter.config import AdapterError, NoraConfig
from nora.adapter.layer import GroupRational, NoraActivation
from nora.rational.calibration import fit_to_inputs, record_inputs
from nora.rational.fit import RationalFit, fit_rational

# activation class name -> fitting target (nn.GELU is resolved through its `approximate` field)
KNOWN_ACTIVATIONS = {
    "GELU": "gelu", "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh", "GELUPytorchTanh": "gelu_tanh",
    "SiLU": "silu", "SiLUActivation": "silu", "Swish": "silu",
    "ReLU": "relu", "Identity": "identity", "Tanh": "tanh", "Sigmoid": "sigmoid",
}


@dataclass
class InjectionReport:
    """What ``apply_nora`` replaced and how well each base rational matches the original."""

    targets: dict[str, dict] = field(default_factory=dict)  # name -> {original, max_error, rms_error, range}

    def max_error(self) -> float:
        return max((t["max_error"] for t in self.targets.values()), default=0.0)

    def __len__(self) -> int:
        return len(self.targets)


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def canonical_name(model: nn.Module, name: str) -> str:
    """Module name relative to the unwrapped base model (drops peft's ``base_model.model.``)."""
    if is_peft_model(model) and name.startswith("base_model.model."):
        return name[len("base_model.model."):]
    return name


def resolve_name(model: nn.Module, canonical: str) -> str:
    return f"base_model.model.{canonical}" if is_peft_model(model) else canonical


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


def _is_activation(module: nn.Module) -> bool:
    name = type(module).__name__
    return (name in KNOWN_ACTIVATIONS or isinstance(module, nn.GELU)) and name != "Identity" \
        and not isinstance(module, GroupRational)


def find_activations(model: nn.Module) -> list[str]:
    """Canonical names of every activation-looking module (for error messages and discovery)."""
    return [canonical_name(model, n) for n, m in model.named_modules() if _is_activation(m)]


def find_targets(model: nn.Module, config: NoraConfig) -> dict[str, nn.Module]:
    """Canonical name -> module for every module matching ``config.targets`` (full-match regexes).

    Raises if a pattern given explicitly matches nothing, or if nothing matches at all.
    """
    patterns = [(p, re.compile(p)) for p in config.targets]
    hits: dict[str, nn.Module] = {}
    matched = {p: 0 for p, _ in patterns}
    for name, mod in model.named_modules():
        cname = canonical_name(model, name)
        if isinstance(mod, GroupRational) or not cname:
            continue
        for p, rx in patterns:
            if rx.fullmatch(cname):
                if len(list(mod.children())) > 0:
                    raise ValueError(f"target {cname!r} ({type(mod).__name__}) is not an activation: it has "
                                     "submodules; point target_modules at the activation itself")
                hits[cname] = mod
                matched[p] += 1
                break
    candidates = find_activations(model)
    hint = ", ".join(candidates[:8]) + (" ..." if len(candidates) > 8 else "") if candidates else "none"
    if config.target_modules is not None:
        missing = [p for p, c in matched.items() if c == 0]
        if missing:
            raise ValueError(f"target pattern(s) {missing} match no module of {type(model).__name__}; "
                             f"activation modules found: {hint}")
    if not hits:
        raise ValueError(f"no activation of {type(model).__name__} matches the targets {config.targets}; "
                         f"activation modules found: {hint}")
    return hits


# Linear layers that feed the MLP activation, by the names common model families use.
_FEEDING_LINEARS = ("fc1", "gate_proj", "w1", "c_fc", "dense_h_to_4h", "wi", "lin1", "up_proj")


def activation_width(model: nn.Module, name: str) -> int | None:
    """Channel width of the activation ``name`` if its MLP's input projection can be identified."""
    parent_name = resolve_name(model, name).rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    for attr in _FEEDING_LINEARS:
        lin = getattr(parent, attr, None)
        out = getattr(lin, "out_features", None) or getattr(getattr(lin, "base_layer", None), "out_features", None)
        if isinstance(out, int):
            return out
    return None


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at the full (dotted) ``name`` of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)




def _module_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def apply_nora(model: nn.Module, config: NoraConfig | None = None, calibration_batches: Iterable | None = None,
               forward: Callable | None = None, fits: dict[str, RationalFit] | None = None) -> InjectionReport:
    """Replace the target activations of ``model`` in place and mark what trains.

    * ``init="fit"`` fits each distinct original activation once over ``config.fit_range``;
      ``init="calibrated"`` records each target's inputs on ``calibration_batches`` (run through
      ``forward(model, batch)`` if given) and fits each layer over its own inputs.
    * ``fits`` (canonical name -> RationalFit) overrides fitting for those targets.
    * Trainable set: on a plain model everything is frozen except the NoRA parameters and
      ``config.trainable_modules``; on a peft model the adapters peft marked stay as they are and
      the NoRA parameters are added, so NoRA++ trains exactly LoRA's plus NoRA's parameters.

    Returns an :class:`InjectionReport`; the config is stored as ``model.nora_config``.
    """
    config = config or NoraConfig()
    if nora_modules(model):
        raise AdapterError(f"this {type(model).__name__} already holds NoRA activations "
                           f"({', '.join(list(nora_modules(model))[:2])}, ...); apply_nora once per model "
                           "(nora.merge_nora folds a trained one into plain rationals)")
    targets = find_targets(model, config)
    for name in targets:
        width = activation_width(model, name)
        if width is not None and width % config.groups:
            raise ValueError(f"groups={config.groups} does not divide the width {width} of {name}; "
                             f"choose a divisor of {width}")
    originals = {name: activation_target(mod) for name, mod in targets.items()}
    fits = dict(fits or {})
    if config.init == "calibrated" and len(fits) < len(targets):
        if calibration_batches is None:
            raise ValueError("init='calibrated' needs calibration_batches (a few real input batches)")
        todo = {n: m for n, m in targets.items() if n not in fits}
        groups = {n: (config.groups if config.per_group_calibration else 1) for n in todo}
        records = record_inputs(model, todo, groups, calibration_batches, forward)
        for name, rec in records.items():
            tgt = originals[name][1]
            if config.per_group_calibration:
                per = [fit_to_inputs(tgt, rec.values(g), config.form, config.degrees,
                                     config.calibration_range_weight, config.fit_range) for g in range(rec.groups)]
                fits[name] = _stack_fits(per)
            else:
                fits[name] = fit_to_inputs(tgt, rec.values(), config.form, config.degrees,
                                           config.calibration_range_weight, config.fit_range)
    report = InjectionReport()
    range_fits: dict[str, RationalFit] = {}
    device = _module_device(model)
    for name in targets:
        oname, tgt = originals[name]
        fit = fits.get(name)
        if fit is None:
            key = oname if isinstance(tgt, str) else f"{oname}@{name}"
            if key not in range_fits:
                range_fits[key] = fit_rational(tgt, form=config.form, degrees=config.degrees,
                                               x_range=config.fit_range)
            fit = range_fits[key]
        num, den = _fit_tensors(fit)
        new = NoraActivation(num, den, form=config.form, backend=config.backend, original=oname,
                             variant=config.variant, r=config.r, alpha=config.alpha,
                             numerator_mode=config.numerator, groups=config.groups,
                             fit_range=(fit.x_min, fit.x_max)).to(device)
        if new.groups != config.groups:
            raise ValueError(f"{name}: fitted coefficients have {new.groups} groups, config says {config.groups}")
        set_module(model, resolve_name(model, name), new)
        report.targets[name] = {"original": oname, "max_error": fit.max_error, "rms_error": fit.rms_error,
                                "range": [fit.x_min, fit.x_max]}
    store_config(model, config)
    set_trainable(model, config)
    return report


def _fit_tensors(fit: RationalFit) -> tuple[torch.Tensor, torch.Tensor]:
    if "per_group" in fit.extra:
        return (torch.tensor(fit.extra["per_group"]["numerator"]), torch.tensor(fit.extra["per_group"]["denominator"]))
    num, den = fit.tensors()
    return num[None], den[None]


def _stack_fits(fits: list[RationalFit]) -> RationalFit:
    """Combine per-group fits into one record (errors: the worst group)."""
    worst = max(fits, key=lambda f: f.max_error)
    return RationalFit(numerator=fits[0].numerator, denominator=fits[0].denominator, form=worst.form,
                       degrees=worst.degrees, max_error=worst.max_error,
                       rms_error=max(f.rms_error for f in fits), x_min=min(f.x_min for f in fits),
                       x_max=max(f.x_max for f in fits), target=worst.target,
                       extra={"per_group": {"numerator": [f.numerator for f in fits],
                                            "denominator": [f.denominator for f in fits]}})


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

    Disabled NoRA activations compute their frozen *base rational* (the fit of the original activation), i.e.
    the model exactly as it was at step 0 of training, not the original activation: the model NoRA training
    started from, which is what a DPO/KL reference model needs. peft's own ``model.disable_adapter()`` does the
    same on a NoRA++ model.
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


def set_trainable(model: nn.Module, config: NoraConfig | None = None) -> None:
    """Freeze the base model and enable NoRA (+ ``trainable_modules``); see :func:`apply_nora`."""
    config = config or get_nora_config(model) or NoraConfig()
    if not is_peft_model(model):
        for p in model.parameters():
            p.requires_grad_(False)
        rx = [re.compile(p) for p in config.trainable_modules]
        hit = {p.pattern: 0 for p in rx}
        for name, mod in model.named_modules():
            for r in rx:
                if r.fullmatch(name):
                    hit[r.pattern] += 1
                    for p in mod.parameters():
                        p.requires_grad_(True)
        missing = [p for p, c in hit.items() if c == 0]
        if missing:
            raise ValueError(f"trainable_modules {missing} match no module of {type(model).__name__}")
    mark_trainable(model)


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
