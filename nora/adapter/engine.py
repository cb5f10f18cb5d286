"""The one injection engine: discover targets -> resolve widths and layouts -> fit (or calibrate) -> build
activations -> swap.

:func:`nora.apply_nora` (a plain or LoRA-wrapped model) and the peft tuner (:class:`nora.tuner.model.NoraModel`,
``peft.get_peft_model`` with a ``NoraPeftConfig``) both run these steps, each of which exists once here:

1. :func:`find_targets`: the activations a config names (default: every known activation in a feed-forward block,
   :mod:`nora.adapter.discover`);
2. :func:`plan_targets`: each target's layout (width, channel dimension) read from the layers around it, ``groups``
   checked against the width (:func:`check_groups`, the one check), and what its base rational is fitted to;
3. :class:`RangeFits` (``init="fit"``: one fit per distinct original activation) or :func:`calibrated_fits`
   (``init="calibrated"``: each target fitted over its recorded inputs, per group if asked);
4. :func:`build_activation`: the :class:`~nora.adapter.layer.NoraActivation` of a target;
5. :func:`swap`: put a module in a target's place (peft's wrapper segments resolved).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from nora.adapter.config import AdapterError, NoraConfig
from nora.adapter.discover import (
    KNOWN_ACTIVATIONS,
    Layout,
    activation_census,
    activation_layout,
    canonical_name,
    default_targets,
    inline_blocks,
    is_activation,
    is_identity,
    is_rational,
    module_index,
    resolve_name,
)
from nora.adapter.layer import NoraActivation
from nora.rational.calibration import fit_to_inputs, record_inputs
from nora.rational.fit import RationalFit, fit_rational


# ------------------------------------------------------------------------------------------ 1. discover
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


# ------------------------------------------------------------------------------------------ 2. layouts
class GroupsError(AdapterError):
    """``groups`` does not divide the width of a target (the application names its config key in front)."""


def groups_message(groups: int, width: int, where: str, source: str = "") -> str:
    """Why ``groups`` cannot cut ``width`` channels, with the divisors that can."""
    divisors = [g for g in range(1, min(width, 64) + 1) if width % g == 0]
    read = f" (read from {source})" if source else ""
    return (
        f"groups={groups} does not divide the width {width} of {where}{read}; "
        f"use a divisor, e.g. {', '.join(map(str, divisors[-6:]))}"
    )


def check_groups(groups: int, width: int | None, where: str, source: str = "") -> None:
    """Raise :class:`GroupsError` if ``groups`` does not divide a known ``width``."""
    if width is not None and width % groups:
        raise GroupsError(groups_message(groups, width, where, source))


@dataclass(frozen=True)
class Target:
    """One activation NoRA replaces: its canonical name, the module (the model's own activation), what its base
    rational is fitted to (``function``: a known activation's name, or a callable wrapping the module) and the
    channels it sees."""

    name: str
    module: nn.Module
    original: str
    function: Callable[[torch.Tensor], torch.Tensor] | str
    layout: Layout

    @property
    def fit_key(self) -> str:
        """Targets with one key share one range fit: a known activation is fitted once per model."""
        return self.original if isinstance(self.function, str) else f"{self.original}@{self.name}"

    def spec(self) -> dict:
        """What an adapter records of this target (``layer_specs``), checked against the model at load time."""
        return {"width": self.layout.width, "channel_dim": self.layout.channel_dim, "original": self.original}


def plan_targets(model: nn.Module, config: NoraConfig, config_name: str = "NoraConfig") -> dict[str, Target]:
    """Canonical name -> :class:`Target` for every target of ``config`` (steps 1 and 2), ``groups`` checked."""
    index = module_index(model)
    plan = {}
    for name, module in find_targets(model, config, config_name).items():
        layout = activation_layout(model, name, index)
        check_groups(config.groups, layout.width, name, layout.source)
        original, function = activation_target(module)
        plan[name] = Target(name, module, original, function, layout)
    return plan


# ------------------------------------------------------------------------------------------ 3. fit
class RangeFits:
    """``init="fit"``: the fit of each distinct original activation over ``config.fit_range``, computed once per
    injection (``fit_rational`` also caches on disk)."""

    def __init__(self, config: NoraConfig) -> None:
        self.config = config
        self._fits: dict[str, RationalFit] = {}

    def __call__(self, target: Target) -> RationalFit:
        if target.fit_key not in self._fits:
            c = self.config
            self._fits[target.fit_key] = fit_rational(
                target.function, form=c.form, degrees=tuple(c.degrees), x_range=tuple(c.fit_range)
            )
        return self._fits[target.fit_key]


def calibrated_fits(
    model: nn.Module,
    config: NoraConfig,
    modules: dict[str, nn.Module],
    channel_dims: dict[str, int],
    batches: Iterable | None,
    forward: Callable | None = None,
) -> dict[str, RationalFit]:
    """``init="calibrated"``: record the inputs of each of ``modules`` (name -> the model's own activation, in place
    in ``model``) on ``batches`` (run through ``forward(model, batch)`` if given) and fit each over them, per channel
    group with ``config.per_group_calibration``."""
    if batches is None:
        raise AdapterError("init='calibrated' needs calibration_batches (a few real input batches)")
    groups = {n: (config.groups if config.per_group_calibration else 1) for n in modules}
    records = record_inputs(model, modules, groups, batches, forward, channel_dims=channel_dims)
    fits = {}
    for name, rec in records.items():
        target = activation_target(modules[name])[1]
        per = [
            fit_to_inputs(
                target,
                rec.values(g) if config.per_group_calibration else rec.values(),
                config.form,
                tuple(config.degrees),
                config.calibration_range_weight,
                tuple(config.fit_range),
            )
            for g in range(groups[name])
        ]
        fits[name] = per[0] if len(per) == 1 else stack_fits(per)
    return fits


def stack_fits(fits: list[RationalFit]) -> RationalFit:
    """Per-group fits as one record (errors: the worst group's)."""
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


def fit_tensors(fit: RationalFit, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fit's coefficients as float32 ``(k, m+1)``, ``(k, n)``: one row per group of a per-group fit, else one row;
    ``rows``: expanded to that many (peft's layers, whose shapes must not depend on how the base was fitted)."""
    if "per_group" in fit.extra:
        num = torch.tensor(fit.extra["per_group"]["numerator"], dtype=torch.float32)
        den = torch.tensor(fit.extra["per_group"]["denominator"], dtype=torch.float32)
    else:
        num, den = (t[None].float() for t in fit.tensors())
    if rows is not None:
        num, den = num.expand(rows, -1).contiguous(), den.expand(rows, -1).contiguous()
    return num, den


# ------------------------------------------------------------------------------------------ 4. build
def build_activation(
    config: NoraConfig,
    fit: RationalFit,
    original: str,
    original_module: nn.Module | None,
    layout: Layout,
    device: torch.device | None = None,
    rows: int | None = None,
) -> NoraActivation:
    """The NoRA activation of one target: base rational ``fit``, update and form as ``config`` says."""
    num, den = fit_tensors(fit, rows)
    act = NoraActivation(
        num,
        den,
        form=config.form,
        backend=config.backend,
        original=original,
        variant=config.variant,
        r=config.r,
        alpha=config.alpha,
        numerator_mode=config.numerator,
        groups=config.groups,
        fit_range=(fit.x_min, fit.x_max),
        channel_dim=layout.channel_dim,
        width=layout.width,
        residual=config.residual,
        original_module=original_module,
    )
    if act.groups != config.groups:
        raise AdapterError(f"fitted coefficients have {act.groups} groups, the config says {config.groups}")
    return act.to(device) if device is not None else act


def module_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (new modules go there)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------ 5. swap
def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at the full (dotted) ``name`` of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap(model: nn.Module, name: str, new: nn.Module, index: dict[str, str] | None = None) -> None:
    """Put ``new`` in the place of the target with canonical ``name`` (inside peft's wrappers on a peft model)."""
    set_module(model, resolve_name(model, name, index), new)
