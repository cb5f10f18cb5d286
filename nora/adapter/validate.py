"""One check of a saved NoRA artefact against the model it is loaded onto, run by every reader: ``load_nora``,
peft's loader (through the NORA tuner's ``inject_adapter`` and ``_remap_adapter_state_dict_for_load``),
``nora.from_pretrained`` of a merged folder (both formats).

What a writer recorded per rational activation (its width, channel dimension, the original activation it was fitted
to, its groups and degrees) is compared with what the model has at that name, the set of saved layers with the
model's targets, and every tensor is checked to be finite. The readers call these before they change the model, and
raise :class:`~nora.adapter.config.AdapterError` naming the file and what differs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from nora.adapter.config import AdapterError, check_patterns
from nora.adapter.discover import Layout, activation_layout, is_rational, module_index, resolve_name
from nora.adapter.engine import activation_target

SHOWN = 4  # names listed in one message before "..."


def listed(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:SHOWN]) + (f" ... ({len(names)} in all)" if len(names) > SHOWN else "")


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of the floating-point tensors holding a NaN or an inf."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | Path) -> None:
    bad = nonfinite(tensors)
    if bad:
        raise AdapterError(
            f"{path}: {len(bad)} tensor(s) hold NaN or inf values ({listed(bad)}); not loading an "
            "adapter that computes NaN (nothing was changed)"
        )


def not_an_activation(module: nn.Module) -> str | None:
    """Why ``module`` cannot be the activation a saved rational replaces (it has submodules or weights), or None."""
    if is_rational(module):
        return None
    cls = type(module).__name__
    if len(list(module.children())) > 0:
        return f"is a {cls} with submodules, not an activation"
    params = [f"{n} {tuple(p.shape)}" for n, p in module.named_parameters(recurse=False)]
    if params:
        return f"is a {cls} holding parameters ({', '.join(params[:2])}), not an activation"
    return None


def layout_problems(layout: Layout, name: str, info: Mapping) -> list[str]:
    """The saved width and channel dimension of layer ``name`` against the model's ``layout`` there."""
    width, saved = layout.width, info.get("width")
    if width is not None and saved is not None and width != saved:
        return [f"{name}: width {width}, the adapter was saved for width {saved}"]
    groups = info.get("groups")
    if width is not None and groups and width % groups:
        return [f"{name}: width {width} is not divisible by the adapter's {groups} groups"]
    saved_dim = info.get("channel_dim", -1)  # adapters written before layouts were saved: channels last
    if width is not None and saved_dim is not None and layout.channel_dim != saved_dim:
        return [f"{name}: channels on dim {layout.channel_dim}, the adapter was saved for dim {saved_dim}"]
    return []


def original_mismatch(name: str, own: str, saved: str | None) -> str | None:
    """The activation the model has at ``name`` (``own``) against the one the adapter was fitted to (``saved``, if
    recorded)."""
    if saved is None or own == saved:
        return None
    return (
        f"{name}: this model's activation is {own}, the adapter was fitted to {saved} (a NoRA adapter "
        "belongs to the base model it was trained on)"
    )


def original_problem(name: str, module: nn.Module, saved: str | None) -> str | None:
    """:func:`original_mismatch` for the module at ``name`` (none for a module that is already a rational)."""
    return None if is_rational(module) else original_mismatch(name, activation_target(module)[0], saved)


def saved_layer_problems(
    model: nn.Module, layers: Mapping[str, Mapping], index: dict[str, str] | None = None, check_original: bool = True
) -> list[str]:
    """Every saved layer (canonical name -> what its writer recorded: ``width``, ``channel_dim``, ``groups``,
    ``original``) against ``model``: the module exists, is an activation, is the activation the adapter was fitted
    to, and has the saved width and layout."""
    index = index if index is not None else module_index(model)
    problems = []
    for name, info in layers.items():
        try:
            module = model.get_submodule(resolve_name(model, name, index))
        except AttributeError:
            problems.append(f"{name}: not a module of this {type(model).__name__}")
            continue
        why = not_an_activation(module)
        if why:
            problems.append(f"{name} {why}")
            continue
        if check_original:
            problem = original_problem(name, module, info.get("original"))
            if problem:
                problems.append(problem)
                continue
        problems += layout_problems(activation_layout(model, name, index), name, info)
    return problems


def coverage_problems(saved: Iterable[str], targets: Iterable[str], model_name: str) -> list[str]:
    """The saved layers against the model's targets for the same config: each side missing from the other."""
    saved, targets = set(saved), set(targets)
    problems = []
    if targets - saved:
        problems.append(
            f"this {model_name} has {len(targets)} target activations, the adapter covers {len(saved)}; "
            f"no saved layer for {listed(targets - saved)}"
        )
    if saved - targets:
        problems.append(
            f"the adapter holds {len(saved)} layers, {len(saved - targets)} of them not targets of "
            f"this {model_name}: {listed(saved - targets)}"
        )
    return problems


def coefficient_problems(
    name: str, numerator: torch.Tensor | None, denominator: torch.Tensor | None, groups: int, degrees: Iterable[int]
) -> list[str]:
    """A layer's saved base coefficients against its recorded groups and degrees: ``(G or 1, m+1)``, ``(G, n)``."""
    m, n = (int(d) for d in degrees)
    problems = []
    if numerator is None or denominator is None:
        missing = [k for k, t in (("base_numerator", numerator), ("base_denominator", denominator)) if t is None]
        return [f"{name}: {', '.join(missing)} missing"]
    if numerator.dim() != 2 or numerator.shape[0] not in (1, groups) or numerator.shape[1] != m + 1:
        problems.append(
            f"{name}.base_numerator: shape {tuple(numerator.shape)}, the config says groups={groups}, "
            f"degrees=[{m}, {n}] ({groups} or 1 rows of {m + 1})"
        )
    if denominator.dim() != 2 or tuple(denominator.shape) != (groups, n):
        problems.append(
            f"{name}.base_denominator: shape {tuple(denominator.shape)}, the config says "
            f"groups={groups}, degrees=[{m}, {n}] ({groups} rows of {n})"
        )
    return problems


def lora_target_problems(module_names: Iterable[str], targets) -> list[str]:
    """peft's LoRA target rule (a list of names matched as the full name or a ``.``-separated suffix; a string: a
    regex matched in full; ``"all-linear"``) applied to ``module_names``: each listed name, or the regex, that matches
    no module. (peft itself refuses a list only when nothing at all matches.)"""
    names = [n for n in module_names if n]
    if targets is None or targets == "all-linear":
        return []
    if isinstance(targets, str):
        check_patterns("lora target_modules", [targets])
        rx = re.compile(targets)
        return [] if any(rx.fullmatch(n) for n in names) else [targets]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


__all__ = [
    "check_finite",
    "nonfinite",
    "not_an_activation",
    "saved_layer_problems",
    "coverage_problems",
    "coefficient_problems",
    "lora_target_problems",
    "layout_problems",
    "original_problem",
]
