"""Matplotlib set up once for files (PNG, no display), and the short layer names every figure uses."""
from __future__ import annotations

import io
import os
import secrets
from pathlib import Path

from nora.errors import OutputError, WRITE_ERRNOS


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: a core install has no matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (parents created; no timestamp metadata, so a figure is reproducible) and close it.

    Rendered in memory, then written to a temp file renamed onto ``path``: a full disk leaves the previous figure
    (or none), never a 0-byte or cut PNG, and is one line naming ``path`` (:class:`nora.errors.OutputError`). The
    same protocol as :func:`nora.files.atomic_path`, which this foundation module may not import (its sibling)."""
    path = Path(path)
    buf = io.BytesIO()
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        fig.savefig(buf, format=fmt, dpi=110, metadata={"Software": None})
    finally:
        pyplot().close(fig)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"  # the umask's mode, as a plain open gives
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if exc.errno in WRITE_ERRNOS:
            raise OutputError(f"{OutputError.from_os_error(exc, path)}; the previous {path.name}, if any, is "
                              "unchanged") from exc
        raise
    return path


def short_layer_name(name: str) -> str:
    """``blocks.3.mlp.act`` -> ``block 3``, ``model.layers.7.mlp.act_fn`` -> ``L7``."""
    return (name.replace("model.layers.", "L").replace("blocks.", "block ").replace(".mlp.act_fn", "")
            .replace(".mlp.act", ""))
