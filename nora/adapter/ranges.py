"""One warning when a range-fitted rational sees inputs beyond its fit range.

With ``init="fit"`` each rational matches its activation over ``fit_range`` only (default [-3, 3]); beyond it
a (5, 4) fit drifts (SiLU's gives F(20) = 17.8, GELU's is off by several units at |x| = 20). After
``apply_nora`` the first forward pass (the calibration batches, if ``apply_nora`` was given any, else the
first batch the model sees) is checked: if any target's inputs leave its fit range, one ``UserWarning`` says
what share of the inputs did, how far they reached and how far the rational is from the original activation
there, and recommends ``init="calibrated"``. The hooks remove themselves after that one pass.

The hooks do nothing while ``torch.compile`` traces the model (counting the inputs outside the range is
data-dependent: tracing it would break the graph at every activation and leave the compiled model in fragments
even after the hooks are gone); the check runs on the first eager forward instead.
:func:`fit_range_check_pending` says whether a model still waits for it (the trainer runs that forward eagerly
when it compiles the model).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Mapping
from typing import Callable, Iterable

import torch
from torch import nn

from nora.adapter.discover import canonical_name
from nora.adapter.layer import NoraActivation
from nora.rational.fit import get_activation

_MAX_CHECKED = 4096  # out-of-range inputs evaluated per layer for the error
_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its _Watch, until the check ran


def _target_fn(target) -> Callable[[torch.Tensor], torch.Tensor]:
    return get_activation(target) if isinstance(target, str) else target


class _Watch:
    """State shared by the hooks of one model: per-layer counts, then one warning."""

    def __init__(self, targets: dict[str, object]):
        self.targets = targets
        self.seen: dict[str, tuple[int, int, float, float]] = {}  # name -> (outside, total, max |x|, max error)
        self.handles: list = []

    def record(self, name: str, module: NoraActivation, x: torch.Tensor) -> None:
        if name in self.seen or module.fit_range is None or not x.is_floating_point():
            return
        x = x.detach()
        lo, hi = module.fit_range
        outside = x[(x < lo) | (x > hi)]
        err = 0.0
        if outside.numel():
            sample = outside.flatten()[:: max(1, outside.numel() // _MAX_CHECKED)].float()
            with torch.no_grad():  # the fit itself: the base coefficients (the same in every group of a range fit)
                fit = NoraActivation(
                    module.base_numerator[:1],
                    module.base_denominator[:1],
                    form=module.form,
                    backend="torch",
                    variant="frozen",
                ).to(sample.device)
                want = _target_fn(self.targets[name])(sample.double().cpu()).to(sample.device)
                err = (fit(sample[:, None]).flatten().double() - want.double()).abs().max().item()
        self.seen[name] = (int(outside.numel()), int(x.numel()), float(x.abs().max().item()) if x.numel() else 0.0, err)

    def finish(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for model in [m for m, w in _PENDING.items() if w is self]:
            del _PENDING[model]
        bad = {n: v for n, v in self.seen.items() if v[0]}
        if not bad:
            return
        outside = sum(v[0] for v in self.seen.values())
        total = sum(v[1] for v in self.seen.values())
        reach = max(v[2] for v in bad.values())
        worst = max(bad, key=lambda n: bad[n][3])
        warnings.warn(
            f"nora: {100 * outside / total:.3g}% ({outside} of {total}) of the inputs of {len(bad)} of "
            f"{len(self.seen)} rational activations lie outside their fit range (|x| up to {reach:.3g}), where "
            f"the rationals are off by up to {bad[worst][3]:.3g} from the original activation ({worst}); fit "
            "where the inputs are with NoraConfig(init='calibrated') and calibration_batches, or widen fit_range",
            UserWarning,
            stacklevel=3,
        )


def _pre_hook(watch: _Watch, name: str, module: nn.Module, args) -> None:
    if args and not torch.compiler.is_compiling():
        watch.record(name, module, args[0])


def _after_forward(watch: _Watch, _module, _args, _output) -> None:
    if not torch.compiler.is_compiling():
        watch.finish()


def fit_range_check_pending(model: nn.Module) -> bool:
    """True while ``model``'s fit-range check (see the module docstring) waits for its first eager forward."""
    return model in _PENDING


def watch_fit_range(
    model: nn.Module,
    targets: dict[str, object],
    calibration_batches: Iterable | None = None,
    forward: Callable | None = None,
) -> None:
    """Check one forward pass against the fit ranges (see the module docstring).

    ``targets``: canonical name -> the original activation (a name of :data:`nora.rational.fit.ACTIVATIONS`
    or a callable). With ``calibration_batches`` the first batch is run now (no gradients, eval mode)."""
    watch = _Watch(targets)
    for name, mod in model.named_modules():
        cname = canonical_name(model, name)
        if isinstance(mod, NoraActivation) and cname in targets:
            watch.handles.append(mod.register_forward_pre_hook(functools.partial(_pre_hook, watch, cname)))
    watch.handles.append(model.register_forward_hook(functools.partial(_after_forward, watch)))
    _PENDING[model] = watch
    if calibration_batches is None:
        return
    batch = next(iter(calibration_batches), None)
    if batch is None:
        watch.finish()
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if forward is not None:
                forward(model, batch)
            elif isinstance(batch, Mapping):
                model(**batch)
            else:
                model(batch)
    finally:
        model.train(was_training)
        watch.finish()
