"""Figures: learned activation curves per layer and group against the original activation."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn


def activation_curves(model: nn.Module, x_range=(-4.0, 4.0), points: int = 401) -> dict:
    """Per rational layer: x, the original activation, and each group's current curve (numpy)."""
    from nora.adapter.inject import canonical_name
    from nora.adapter.layer import GroupRational
    from nora.rational.fit import ACTIVATIONS
    from nora.rational.functional import rational_reference

    x = torch.linspace(float(x_range[0]), float(x_range[1]), points, dtype=torch.float64)
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, GroupRational):
            continue
        with torch.no_grad():
            num, den = (t.detach().double().cpu() for t in mod.coefficients())
            g = num.shape[0]
            y = rational_reference(x[:, None].expand(-1, g).contiguous(), num, den, mod.form)  # (points, G)
            base = rational_reference(x[:, None], mod.base_numerator.double().cpu()[:1],
                                      mod.base_denominator.double().cpu()[:1], mod.form)[:, 0]
        orig = ACTIVATIONS.get(mod.original)
        out[canonical_name(model, name)] = {
            "x": x.numpy(), "groups": y.T.numpy(), "base": base.numpy(),
            "original": orig(x).numpy() if orig else None, "original_name": mod.original}
    return out


def plot_activation_curves(model: nn.Module, path: str | Path, x_range=(-4.0, 4.0), title: str | None = None) -> Path | None:
    """Save a grid of subplots (one per replaced activation) to ``path``; None if there is none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = activation_curves(model, x_range)
    if not curves:
        return None
    n = len(curves)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharex=True)
    for ax, (name, c) in zip(axes.flat, curves.items()):
        if c["original"] is not None:
            ax.plot(c["x"], c["original"], "k--", lw=1.2, label=c["original_name"])
        cmap = plt.get_cmap("viridis")
        for i, y in enumerate(c["groups"]):
            ax.plot(c["x"], y, color=cmap(i / max(1, len(c["groups"]) - 1)), lw=0.9, alpha=0.85,
                    label="groups" if i == 0 else None)
        ax.set_title(name.replace("model.layers.", "L").replace("blocks.", "B"), fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
