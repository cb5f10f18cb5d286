"""Matplotlib set up once for files (PNG, no display), and the short layer names every figure uses."""

from __future__ import annotations

import io
from pathlib import Path

from nora.files import atomic_write


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: a core install has no matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (parents created; no timestamp metadata, so a figure is reproducible) and close it.

    Rendered in memory, then written with :func:`nora.files.atomic_write`: a full disk leaves the previous figure
    (or none), never a 0-byte or cut PNG, and is one line naming ``path`` (:class:`nora.errors.OutputError`)."""
    path = Path(path)
    buf = io.BytesIO()
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        fig.savefig(buf, format=fmt, dpi=110, metadata={"Software": None})
    finally:
        pyplot().close(fig)
    atomic_write(path, lambda tmp: tmp.write_bytes(buf.getvalue()))
    return path


def short_layer_name(name: str) -> str:
    """``blocks.3.mlp.act`` -> ``block 3``, ``model.layers.7.mlp.act_fn`` -> ``L7``."""
    return (
        name.replace("model.layers.", "L")
        .replace("blocks.", "block ")
        .replace(".mlp.act_fn", "")
        .replace(".mlp.act", "")
    )
