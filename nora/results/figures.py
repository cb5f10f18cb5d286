"""Figures (matplotlib, PNG) of results across runs (a run's own activation figure:
:func:`nora.adapter.curves.activation_figure`).

* :func:`accuracy_vs_params`: accuracy (mean ± std over seeds) against trainable parameters, one point per method;
* :func:`subspace_figure`: the functional-subspace analysis (:mod:`nora.results.subspace`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from nora.plotting import pyplot, save_figure, short_layer_name
from nora.results.subspace import identical_methods


@dataclass
class Point:
    label: str
    params: int
    mean: float
    std: float | None
    n: int


def accuracy_vs_params(
    panels: dict[str, Sequence[Point]], path: str | Path, title: str, ylabel: str = "accuracy (%)"
) -> Path | None:
    """One panel per setting (e.g. dataset); x: trainable parameters (log), y: mean ± std over seeds."""
    panels = {k: [p for p in v if p.params] for k, v in panels.items()}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (name, pts) in zip(axes[0], panels.items()):
        for i, p in enumerate(pts):
            # tab10 repeats after ten methods: the next ten get another marker, so no two share a symbol
            ax.errorbar(
                [p.params],
                [p.mean],
                yerr=[p.std or 0.0],
                fmt="osD^"[i // 10 % 4],
                color=cmap(i % 10),
                capsize=3,
                label=f"{p.label} (n={p.n})",
            )
            ax.annotate(p.label, (p.params, p.mean), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def subspace_figure(analyses, path: str | Path, title: str) -> Path | None:
    """Four panels: coefficient-update norm per layer, normalised singular values, function-space change per
    layer, cross-seed cosine of the function change per layer (mean ± std over seeds where applicable)."""
    analyses = [a for a in analyses if a is not None and a.per_seed]
    if not analyses:
        return None
    same = identical_methods(analyses)
    if same:
        title += " (" + "; ".join(f"{a} and {b} coincide" for a, b in same) + ")"
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    cmap = plt.get_cmap("tab10")
    for i, a in enumerate(analyses):
        c = cmap(i % 10)
        layers = a.layers
        xs = np.arange(len(layers))
        for ax, key in ((axes[0], "update_norm"), (axes[2], "function_l2")):
            vals = np.array([[seed[name].__dict__[key] for name in layers] for seed in a.per_seed])
            ax.errorbar(
                xs,
                vals.mean(0),
                yerr=vals.std(0, ddof=1) if len(vals) > 1 else None,
                marker="o",
                color=c,
                capsize=2,
                label=f"{a.method} (n={len(vals)})",
            )
        sv = [
            seed[name].singular / seed[name].singular.sum()
            for seed in a.per_seed
            for name in layers
            if seed[name].singular.sum() > 0
        ]
        if sv:
            k = min(len(s) for s in sv)
            m = np.mean([s[:k] for s in sv], axis=0)
            axes[1].plot(np.arange(1, k + 1), m, marker="o", color=c, label=a.method)
        if len(a.per_seed) > 1:
            for cos, marker, ls, what in (
                (a.cross_seed_func, "o", "-", "function"),
                (a.cross_seed_coef, "x", "--", "coefficients"),
            ):
                axes[3].plot(
                    xs,
                    [np.nan if cos.get(name) is None else cos[name] for name in layers],
                    marker=marker,
                    ls=ls,
                    color=c,
                    label=f"{a.method}: {what}",
                )
    names = [short_layer_name(name) for name in analyses[0].layers]
    for ax in (axes[0], axes[2], axes[3]):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, fontsize=7)
    axes[0].set_title("‖ΔC‖_F per layer (coefficient update)", fontsize=9)
    axes[0].set_yscale("log")
    axes[1].set_title("singular values of ΔC (G×10), normalised", fontsize=9)
    axes[1].set_xlabel("index")
    axes[2].set_title("RMS |F_g − F_base| over the fit range", fontsize=9)
    axes[3].set_title("cosine of the update across seeds", fontsize=9)
    axes[3].set_ylim(-1.05, 1.05)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
