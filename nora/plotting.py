"""Matplotlib set up once for files (PNG, no display), and the short layer names every figure uses."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: a core install has no matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (parents created; no timestamp metadata, so a figure is reproducible) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    pyplot().close(fig)
    return path


def short_layer_name(name: str) -> str:
    """``blocks.3.mlp.act`` -> ``block 3``, ``model.layers.7.mlp.act_fn`` -> ``L7``."""
    return (name.replace("model.layers.", "L").replace("blocks.", "block ").replace(".mlp.act_fn", "")
            .replace(".mlp.act", ""))
