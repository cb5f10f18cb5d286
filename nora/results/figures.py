"""Figures (matplotlib, PNG) from run directories only.

* :func:`activation_figure`: a run's learned activation curves per layer and group against the original
  activation and the fitted base rational, and each group's change ``F_g - F_base``, rebuilt from the saved
  adapter tensors (no base model needed);
* :func:`accuracy_vs_params`: accuracy (mean ± std over seeds) against trainable parameters, one point per method;
* :func:`subspace_figure`: the functional-subspace analysis (:mod:`nora.results.subspace`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    _plt().close(fig)
    return path


def _short(name: str) -> str:
    return (name.replace("model.layers.", "L").replace("blocks.", "block ").replace(".mlp.act_fn", "")
            .replace(".mlp.act", ""))


def activation_figure(run_dir: str | Path, path: str | Path, title: str | None = None, margin: float = 1.0,
                      max_layers: int = 12) -> Path | None:
    """Two panels per layer (curves; change vs the base rational); None if the run has no NoRA activations.

    x spans the fit range plus ``margin`` on each side (shaded: the fit range); the y axes are scaled to the
    values inside the fit range, so a rational that drifts far outside it leaves the plot there rather than
    flattening everything else."""
    import numpy as np
    import torch

    from nora.rational.fit import ACTIVATIONS
    from nora.results.subspace import load_layers

    layers = load_layers(run_dir)
    if not layers:
        return None
    names = list(layers)
    if len(names) > max_layers:  # evenly spaced subset for deep models (e.g. 32 LLaMA layers)
        idx = np.linspace(0, len(names) - 1, max_layers).round().astype(int)
        names = [names[i] for i in dict.fromkeys(idx)]
    plt = _plt()
    cols = min(4, len(names))
    blocks = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(2 * blocks, cols, figsize=(3.3 * cols, 4.6 * blocks), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2] * blocks})
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(names):
        lay = layers[name]
        lo, hi = lay.fit_range
        x = np.linspace(lo - margin, hi + margin, 401)
        y, y0 = lay.curves(x)
        top, bottom = axes[2 * (i // cols)][i % cols], axes[2 * (i // cols) + 1][i % cols]
        orig = ACTIVATIONS.get(lay.original) if lay.original else None
        if orig is not None:
            top.plot(x, orig(torch.as_tensor(x)).numpy(), "k--", lw=1.2, label=lay.original)
        top.plot(x, y0[0], color="0.55", lw=1.0, ls=":", label="base rational")
        g = y.shape[0]
        for j in range(g):
            c = cmap(j / max(1, g - 1))
            top.plot(x, y[j], color=c, lw=0.9, alpha=0.85, label="groups" if j == 0 else None)
            bottom.plot(x, y[j] - y0[j], color=c, lw=0.9, alpha=0.85)
        inside = (x >= lo) & (x <= hi)
        for ax, vals in ((top, [y[:, inside], y0[:, inside]]), (bottom, [(y - y0)[:, inside]])):
            if orig is not None and ax is top:
                vals.append(orig(torch.as_tensor(x[inside])).numpy()[None])
            v_lo = min(float(np.min(v)) for v in vals)
            v_hi = max(float(np.max(v)) for v in vals)
            pad = 0.15 * max(v_hi - v_lo, 1e-6)
            ax.set_ylim(v_lo - pad, v_hi + pad)
        for ax in (top, bottom):
            ax.axvspan(lo, hi, color="0.92", zorder=0)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        bottom.axhline(0, color="k", lw=0.6)
        top.set_title(_short(name), fontsize=8)
        bottom.set_ylabel("F_g − F_base", fontsize=7)
    for k in range(len(names), blocks * cols):
        axes[2 * (k // cols)][k % cols].axis("off")
        axes[2 * (k // cols) + 1][k % cols].axis("off")
    axes[0][0].legend(fontsize=6, loc="upper left")
    fig.suptitle(title or str(run_dir), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


@dataclass
class Point:
    label: str
    params: int
    mean: float
    std: float | None
    n: int


def accuracy_vs_params(panels: dict[str, Sequence[Point]], path: str | Path, title: str,
                       ylabel: str = "accuracy (%)") -> Path | None:
    """One panel per setting (e.g. dataset); x: trainable parameters (log), y: mean ± std over seeds."""
    panels = {k: [p for p in v if p.params] for k, v in panels.items()}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (name, pts) in zip(axes[0], panels.items()):
        for i, p in enumerate(pts):
            # tab10 repeats after ten methods: the next ten get another marker, so no two share a symbol
            ax.errorbar([p.params], [p.mean], yerr=[p.std or 0.0], fmt="osD^"[i // 10 % 4], color=cmap(i % 10),
                        capsize=3, label=f"{p.label} (n={p.n})")
            ax.annotate(p.label, (p.params, p.mean), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def subspace_figure(analyses, path: str | Path, title: str) -> Path | None:
    """Four panels: coefficient-update norm per layer, normalised singular values, function-space change per
    layer, cross-seed cosine of the function change per layer (mean ± std over seeds where applicable)."""
    import numpy as np

    from nora.results.subspace import identical_methods

    analyses = [a for a in analyses if a is not None and a.per_seed]
    if not analyses:
        return None
    same = identical_methods(analyses)
    if same:
        title += " (" + "; ".join(f"{a} and {b} coincide" for a, b in same) + ")"
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    cmap = plt.get_cmap("tab10")
    for i, a in enumerate(analyses):
        c = cmap(i % 10)
        layers = a.layers
        xs = np.arange(len(layers))
        for ax, key in ((axes[0], "update_norm"), (axes[2], "function_l2")):
            vals = np.array([[seed[name].__dict__[key] for name in layers] for seed in a.per_seed])
            ax.errorbar(xs, vals.mean(0), yerr=vals.std(0, ddof=1) if len(vals) > 1 else None, marker="o",
                        color=c, capsize=2, label=f"{a.method} (n={len(vals)})")
        sv = [seed[name].singular / seed[name].singular.sum() for seed in a.per_seed for name in layers
              if seed[name].singular.sum() > 0]
        if sv:
            k = min(len(s) for s in sv)
            m = np.mean([s[:k] for s in sv], axis=0)
            axes[1].plot(np.arange(1, k + 1), m, marker="o", color=c, label=a.method)
        if len(a.per_seed) > 1:
            for cos, marker, ls, what in ((a.cross_seed_func, "o", "-", "function"),
                                          (a.cross_seed_coef, "x", "--", "coefficients")):
                axes[3].plot(xs, [np.nan if cos.get(name) is None else cos[name] for name in layers], marker=marker,
                             ls=ls, color=c, label=f"{a.method}: {what}")
    names = [_short(name) for name in analyses[0].layers]
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
    return _save(fig, path)
