"""The learned curves of a saved NoRA adapter, from its files alone (no base model, no data): per layer the
per-group coefficients, the frozen base ones, and the curves they draw (:func:`load_layers`); the activation
figure a training run writes as ``activations.png`` (:func:`activation_figure`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from nora.adapter.io import CONFIG_NAME, WEIGHTS_NAME
from nora.adapter.layer import NoraActivation
from nora.adapter.peft_format import read_nora_layers, read_originals, read_peft_nora_config
from nora.plotting import pyplot, save_figure, short_layer_name
from nora.rational.fit import ACTIVATIONS
from nora.rational.functional import rational_reference

GRID_POINTS = 401


@dataclass
class Layer:
    name: str
    num: np.ndarray  # (G, m+1) effective per-group numerator
    den: np.ndarray  # (G, n)
    base_num: np.ndarray  # (G, m+1)
    base_den: np.ndarray  # (G, n)
    form: str
    original: str | None
    variant: str
    r: int
    fit_range: tuple[float, float]
    residual: bool = False  # phi(x) + (F_g(x) - F_base(x)) instead of F_g(x)

    @property
    def delta(self) -> np.ndarray:
        """(G, m+1+n): the per-group coefficient update."""
        return np.concatenate([self.num - self.base_num, self.den - self.base_den], axis=1)

    def grid(self, points: int = GRID_POINTS) -> np.ndarray:
        return np.linspace(self.fit_range[0], self.fit_range[1], points)

    def curves(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(G, len(x)) adapted curves and (G, len(x)) curves at step 0: the rationals (paper form), or in the
        residual form the original activation plus the change of the rational, and the original activation (the
        base rational stands in for an activation nora does not know by name)."""
        y, y0 = group_curves(x, self.num, self.den, self.form), group_curves(x, self.base_num, self.base_den, self.form)
        phi = ACTIVATIONS.get(self.original) if self.original else None
        if not self.residual or phi is None:
            return y, y0
        start = np.broadcast_to(phi(torch.as_tensor(np.asarray(x, np.float64))).numpy(), y0.shape)
        return start + (y - y0), start.copy()


def group_curves(x: np.ndarray, num: np.ndarray, den: np.ndarray, form: str) -> np.ndarray:
    """Per-group rational P_g(x)/Q_g(x) in float64, shape (G, len(x)): the one formula
    (:func:`nora.rational.functional.rational_reference`) on the grid repeated once per group."""
    num, den = torch.as_tensor(np.asarray(num, np.float64)), torch.as_tensor(np.asarray(den, np.float64))
    grid = torch.as_tensor(np.asarray(x, dtype=np.float64))
    return rational_reference(grid[:, None].expand(-1, num.shape[0]), num, den, form).T.numpy()


def _peft_format_meta(adir: Path, cfg: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A NoRA peft adapter (nora.tuner) as the two-part format's meta and tensors: one config for every layer."""
    originals = read_originals(adir)
    specs = cfg.get("layer_specs") or {}
    layers, tensors = {}, {}
    for name, state in read_nora_layers(adir).items():
        layers[name] = {
            "form": cfg["form"],
            "original": originals.get(name),
            "variant": cfg["variant"],
            "r": cfg["r"],
            "alpha": cfg["alpha"],
            "numerator_mode": cfg["numerator"],
            "groups": int(state["base_denominator"].shape[0]),
            "residual": bool(cfg.get("residual", False)),
            # the inputs its base was fitted over, where recorded (a calibrated layer's own range)
            "fit_range": (specs.get(name) or {}).get("fit_range"),
        }
        tensors.update({f"{name}.{k}": v for k, v in state.items()})
    return {"config": {"fit_range": cfg.get("fit_range", (-3.0, 3.0))}, "layers": layers}, tensors


def load_layers(adapter_dir: str | Path) -> dict[str, Layer]:
    """Every NoRA activation of a saved adapter ({} if the directory holds none), in either format: nora's
    (``nora_config.json``, ``nora_adapter.safetensors``) or peft's (``peft_type`` ``NORA``)."""
    adir = Path(adapter_dir)
    cfg_path, w_path = adir / CONFIG_NAME, adir / WEIGHTS_NAME
    peft_cfg = read_peft_nora_config(adir)
    if peft_cfg is not None:
        meta, tensors = _peft_format_meta(adir, peft_cfg)
        return _layers(meta, tensors)
    if not cfg_path.exists() or not w_path.exists():
        return {}
    meta = json.loads(cfg_path.read_text())
    return _layers(meta, load_file(str(w_path)))


def _layers(meta: dict, tensors: dict[str, torch.Tensor]) -> dict[str, Layer]:
    fit_range = tuple(float(v) for v in (meta.get("config") or {}).get("fit_range", (-3.0, 3.0)))
    out = {}
    for name, info in meta["layers"].items():
        mod = NoraActivation(
            tensors[f"{name}.base_numerator"],
            tensors[f"{name}.base_denominator"],
            form=info["form"],
            backend="auto",
            original=info.get("original"),
            variant=info["variant"],
            r=int(info.get("r", 3)),
            alpha=float(info.get("alpha", 6.0)),
            numerator_mode=info.get("numerator_mode", "group"),
            groups=int(info["groups"]),
        )
        state = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        mod.load_state_dict(state, strict=True)
        with torch.no_grad():
            num, den = (t.detach().double().numpy().copy() for t in mod.coefficients())
            g = mod.groups
            base_num = mod.base_numerator.double().expand(g, -1).numpy().copy()
            base_den = mod.base_denominator.double().numpy().copy()
        layer_range = tuple(float(v) for v in info["fit_range"]) if info.get("fit_range") else fit_range
        out[name] = Layer(
            name,
            num,
            den,
            base_num,
            base_den,
            info["form"],
            info.get("original"),
            info["variant"],
            int(info.get("r", 3)),
            layer_range,
            bool(info.get("residual", False)),
        )
    return out


def activation_figure(
    adapter_dir: str | Path, path: str | Path, title: str | None = None, margin: float = 1.0, max_layers: int = 12
) -> Path | None:
    """A saved adapter's learned activation curves per layer and group against the original activation and the
    fitted base rational (top), and each group's change ``F_g - F_base`` (bottom), rebuilt from the adapter
    tensors alone (no base model): two panels per layer; None if the adapter has no NoRA activations.

    x spans the fit range plus ``margin`` on each side (shaded: the fit range); the y axes are scaled to the
    values inside the fit range, so a rational that drifts far outside it leaves the plot there rather than
    flattening everything else."""
    layers = load_layers(adapter_dir)
    if not layers:
        return None
    names = list(layers)
    if len(names) > max_layers:  # evenly spaced subset for deep models (e.g. 32 LLaMA layers)
        idx = np.linspace(0, len(names) - 1, max_layers).round().astype(int)
        names = [names[i] for i in dict.fromkeys(idx)]
    plt = pyplot()
    cols = min(4, len(names))
    blocks = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(
        2 * blocks,
        cols,
        figsize=(3.3 * cols, 4.6 * blocks),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 2] * blocks},
    )
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
        if not lay.residual:  # (in the residual form the start is the original activation itself)
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
        top.set_title(short_layer_name(name), fontsize=8)
        bottom.set_ylabel("F_g − F_base", fontsize=7)
    for k in range(len(names), blocks * cols):
        axes[2 * (k // cols)][k % cols].axis("off")
        axes[2 * (k // cols) + 1][k % cols].axis("off")
    axes[0][0].legend(fontsize=6, loc="upper left")
    fig.suptitle(title or str(adapter_dir), fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
