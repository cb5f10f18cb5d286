"""The functional-subspace analysis, from saved adapters alone (no base model, no data).

The paper claims NoRA "constrains adaptation to a low-dimensional functional subspace, implicitly regularizing
update magnitude and direction". Each NoRA-style run saves, per replaced activation, its frozen base
coefficients and its trainable update (``adapter/nora_adapter.safetensors`` + ``nora_config.json``), from which
the per-group coefficients ``a_g, b_g`` and the update ``Δ_g = (a_g - a_base, b_g - b_base)`` follow exactly as in
training (:class:`nora.adapter.layer.NoraActivation`). Per layer we measure:

* ``update_norm``: ``||Δ||_F`` of the stacked G x (m+1+n) update (coefficient space; magnitude);
* ``effective_rank``: ``exp(H(p))`` with ``p = σ / Σσ`` over the singular values σ of that matrix (Roy &
  Vetterli, 2007): how many directions the G groups' updates really use; ``top_energy``: share of ``Σσ²`` in the
  first ``r`` singular values (r = NoRA's rank, 3 by default);
* ``function_l2``: the RMS over the G groups and an even grid of the layer's fit range (the inputs its base
  rational was fitted over, saved per layer in ``nora_config.json``; calibrated runs: the recorded inputs' hull
  with the configured range; adapters without it: the run's ``fit_range``, [-3, 3] by default) of
  ``F_g(x) - F_base(x)``: how far the activation function itself moved; ``function_rel`` divides it by the RMS of
  the base activation over the same grid;
* across seeds of the same method: the cosine similarity of the flattened updates (coefficient direction) and of
  the function changes ``F_g - F_base`` on the grid (function-space direction), averaged over seed pairs.

Coefficients of different powers of x have different scales, so the function-space numbers are the ones to
compare across methods; the coefficient norms show how far each parametrisation moved its parameters.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from nora.adapter.curves import Layer, load_layers
from nora.results.stats import summarize
from nora.runs.layout import RunDir


def effective_rank(m: np.ndarray) -> float:
    s = np.linalg.svd(m, compute_uv=False)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(math.exp(-(p * np.log(p)).sum()))


def singular_values(m: np.ndarray) -> np.ndarray:
    return np.linalg.svd(m, compute_uv=False)


def cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.ravel(a), np.ravel(b)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return None
    return float(a @ b / (na * nb))


@dataclass
class LayerStats:
    layer: str
    update_norm: float
    effective_rank: float
    top_energy: float
    function_l2: float
    function_rel: float
    singular: np.ndarray = field(repr=False)


def layer_stats(layer: Layer, top: int = 3) -> LayerStats:
    d = layer.delta
    s = singular_values(d)
    energy = float((s[:top] ** 2).sum() / (s**2).sum()) if (s**2).sum() > 0 else float("nan")
    x = layer.grid()
    y, y0 = layer.curves(x)
    diff = y - y0
    l2 = float(np.sqrt(np.mean(diff**2)))
    base_rms = float(np.sqrt(np.mean(y0**2)))
    return LayerStats(
        layer.name,
        float(np.linalg.norm(d)),
        effective_rank(d),
        energy,
        l2,
        l2 / base_rms if base_rms > 0 else float("nan"),
        s,
    )


@dataclass
class MethodAnalysis:
    method: str
    runs: list[Path]
    per_seed: list[dict[str, LayerStats]]  # one {layer: stats} per run
    cross_seed_coef: dict[str, float | None]  # layer -> mean cosine over seed pairs (coefficient update)
    cross_seed_func: dict[str, float | None]  # layer -> mean cosine over seed pairs (function change)
    deltas: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)  # per run: layer -> Δ

    @property
    def layers(self) -> list[str]:
        return list(self.per_seed[0]) if self.per_seed else []


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def analyse_method(method: str, run_dirs: Sequence[Path]) -> MethodAnalysis | None:
    loaded = [(Path(d), load_layers(RunDir(d).adapter)) for d in run_dirs]
    loaded = [(d, layers) for d, layers in loaded if layers]
    if not loaded:
        return None
    per_seed = [{name: layer_stats(layer) for name, layer in layers.items()} for _d, layers in loaded]
    names = list(loaded[0][1])
    coef, func = {}, {}
    for name in names:
        cs, fs = [], []
        for (_a, la), (_b, lb) in itertools.combinations(loaded, 2):
            if name not in la or name not in lb:
                continue
            cs.append(cosine(la[name].delta, lb[name].delta))
            x = la[name].grid()
            ya, ya0 = la[name].curves(x)
            yb, yb0 = lb[name].curves(x)
            fs.append(cosine(ya - ya0, yb - yb0))
        coef[name], func[name] = _mean(cs), _mean(fs)
    return MethodAnalysis(
        method,
        [d for d, _ in loaded],
        per_seed,
        coef,
        func,
        [{name: layer.delta for name, layer in layers.items()} for _d, layers in loaded],
    )


def identical_methods(analyses: Sequence[MethodAnalysis], atol: float = 1e-6) -> list[tuple[str, str]]:
    """Pairs of methods whose runs (taken in the same order, e.g. by seed) learnt the same updates.

    Rational FT (train ``c`` from ``c_base``) and zero-init FT (train ``δ`` from 0 with ``c = c_base + δ``) follow
    the same trajectory whenever nothing distinguishes ``c`` from ``δ``: equal gradients, and an optimizer step
    that does not depend on the parameter's value (Adam/SGD without weight decay on these parameters)."""
    out = []
    for a, b in itertools.combinations(analyses, 2):
        if not a.deltas or len(a.deltas) != len(b.deltas):
            continue
        same = all(
            set(da) == set(db) and all(np.allclose(da[k], db[k], rtol=0, atol=atol) for k in da)
            for da, db in zip(a.deltas, b.deltas)
        )
        if same:
            out.append((a.method, b.method))
    return out


METRICS = (
    ("update_norm", "‖Δ‖_F (coefficients)"),
    ("effective_rank", "effective rank of Δ"),
    ("top_energy", "energy in top-r singular values"),
    ("function_l2", "RMS |F - F_base| over the fit range"),
    ("function_rel", "same, relative to RMS F_base"),
)


def summary_rows(analysis: MethodAnalysis) -> list[dict]:
    """Per layer and over all layers: mean ± std over seeds of each metric, plus the cross-seed cosines."""
    rows = []
    for name in analysis.layers + ["all layers"]:
        row = {"method": analysis.method, "layer": name, "n": len(analysis.per_seed)}
        for key, _label in METRICS:
            if name == "all layers":
                vals = [_mean([getattr(st, key) for st in seed.values()]) for seed in analysis.per_seed]
            else:
                vals = [getattr(seed[name], key) for seed in analysis.per_seed if name in seed]
            s = summarize([v for v in vals if v is not None and not math.isnan(v)])
            row[f"{key}_mean"], row[f"{key}_std"] = s.mean, s.std
        if name == "all layers":
            row["cross_seed_cos_coef"] = _mean(analysis.cross_seed_coef.values())
            row["cross_seed_cos_function"] = _mean(analysis.cross_seed_func.values())
        else:
            row["cross_seed_cos_coef"] = analysis.cross_seed_coef.get(name)
            row["cross_seed_cos_function"] = analysis.cross_seed_func.get(name)
        rows.append(row)
    return rows
