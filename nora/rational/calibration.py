"""Calibrated initialisation: fit each replaced activation where its inputs actually live.

A fit on [-3, 3] is accurate there but drifts outside (a (5,4) SiLU fit gives F(20) = 17.8), while a
pretrained LLaMA's gate pre-activations reach far beyond that range. Calibration runs a few real
batches through the *original* model, records every target activation's input values and fits that
layer's coefficients over them:

* the fit points are the empirical quantiles of the recorded inputs (each carrying equal weight, so
  dense regions dominate), plus an even grid carrying ``range_weight`` of the total weight over the
  hull of the recorded [min, max] and the configured ``fit_range``, so the rare tails are still
  followed and the fit never covers less than a plain range fit would;
* with ``per_group=True`` each channel group gets its own fit over its own inputs, otherwise one fit
  over the pooled inputs is shared by all groups of the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from nora.rational.fit import ActivationFn, RationalFit, fit_rational


@dataclass
class InputRecord:
    """A bounded, deterministic subsample of one activation's inputs (per group)."""

    groups: int
    max_samples: int
    samples: list[list[torch.Tensor]]  # [group][chunk]
    count: int = 0
    lo: torch.Tensor | None = None  # per-group running min
    hi: torch.Tensor | None = None

    @classmethod
    def empty(cls, groups: int, max_samples: int) -> "InputRecord":
        return cls(groups, max_samples, [[] for _ in range(groups)])

    def add(self, x: torch.Tensor, channel_dim: int = -1) -> None:
        x = x.detach()
        if channel_dim != -1 and x.dim() > 1:  # conv layout (N, C, ...): channels last for grouping
            x = x.movedim(channel_dim, -1)
        d = x.shape[-1]
        if d % self.groups:
            raise ValueError(f"activation width {d} is not divisible by {self.groups} groups")
        xg = x.reshape(-1, self.groups, d // self.groups).transpose(0, 1).reshape(self.groups, -1).float()
        lo, hi = xg.amin(dim=1).cpu(), xg.amax(dim=1).cpu()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.count += xg.shape[1]
        per_batch = max(1, self.max_samples // 8)
        stride = max(1, xg.shape[1] // per_batch)  # deterministic strided subsample
        for g in range(self.groups):
            self.samples[g].append(xg[g, ::stride].cpu())

    def values(self, group: int | None = None) -> torch.Tensor:
        parts = self.samples[group] if group is not None else [t for s in self.samples for t in s]
        v = torch.cat(parts).double()
        if v.numel() > self.max_samples:
            v = v.sort().values[torch.linspace(0, v.numel() - 1, self.max_samples).long()]
        return v


def calibration_points(
    values: torch.Tensor,
    num_quantiles: int = 1024,
    num_range: int = 512,
    range_weight: float = 0.1,
    cover: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit points and weights from a sample of inputs (see the module docstring)."""
    v = values.double().reshape(-1)
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        raise ValueError("no finite activation inputs were recorded")
    qs = (
        torch.quantile(v, torch.linspace(0, 1, num_quantiles, dtype=torch.float64))
        if v.numel() < 2**24
        else v.sort().values[torch.linspace(0, v.numel() - 1, num_quantiles).long()]
    )
    lo, hi = v.min().item(), v.max().item()
    if cover is not None:
        lo, hi = min(lo, float(cover[0])), max(hi, float(cover[1]))
    if hi - lo < 1e-3:
        lo, hi = lo - 0.5e-3, hi + 0.5e-3
    grid = torch.linspace(lo, hi, num_range, dtype=torch.float64)
    x = torch.cat([qs, grid])
    w = torch.cat(
        [
            torch.full((num_quantiles,), (1 - range_weight) / num_quantiles, dtype=torch.float64),
            torch.full((num_range,), range_weight / num_range, dtype=torch.float64),
        ]
    )
    return x, w


def fit_to_inputs(
    target: ActivationFn | str,
    values: torch.Tensor,
    form: str,
    degrees: Sequence[int],
    range_weight: float = 0.1,
    cover: Sequence[float] | None = None,
) -> RationalFit:
    """Fit over a recorded input sample (quantiles + a grid over the hull with ``cover``)."""
    x, w = calibration_points(values, range_weight=range_weight, cover=cover)
    return fit_rational(target, form=form, degrees=degrees, x=x, weights=w)


@torch.no_grad()
def record_inputs(
    model: nn.Module,
    modules: dict[str, nn.Module],
    groups: dict[str, int],
    batches: Iterable,
    forward: Callable[[nn.Module, object], object] | None = None,
    max_samples: int = 1 << 16,
    channel_dims: dict[str, int] | None = None,
) -> dict[str, InputRecord]:
    """Run ``batches`` through ``model`` and record the inputs of each module in ``modules``.

    ``channel_dims`` (name -> -1 or 1) says where each module's channels are (default: last).

    ``forward(model, batch)`` runs one batch (default: ``model(batch)``, or ``model(**batch)`` for a
    dict). The model is put in eval mode for the duration and restored afterwards.
    """
    records = {name: InputRecord.empty(groups[name], max_samples) for name in modules}
    hooks = []
    dims = {name: (channel_dims or {}).get(name, -1) for name in modules}
    for name, mod in modules.items():

        def hook(_m, args, _rec=records[name], _dim=dims[name]):
            _rec.add(args[0], _dim)

        hooks.append(mod.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            elif isinstance(batch, Mapping):  # dicts and tokenizer outputs (BatchEncoding)
                model(**batch)
            else:
                model(batch)
            n += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("calibration needs at least one batch, got none")
    return records
