"""Atomic checkpoints with everything needed to continue a run exactly where it stopped."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then ``os.replace`` onto ``path``.

    A crash or kill during the write leaves the previous file untouched (and at worst a stray
    ``.tmp`` file, removed by the next successful save).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What changes during training: every trainable parameter plus the NoRA activations' buffers
    (their fitted base coefficients), keyed by parameter name. Frozen pretrained weights are rebuilt
    from the model config on resume and are not stored."""
    from nora.adapter.layer import GroupRational

    out = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for mname, mod in model.named_modules():
        if isinstance(mod, GroupRational):
            for bname, b in mod.named_buffers(recurse=False):
                out[f"{mname}.{bname}"] = b.detach().clone()
    return out


def load_training_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    missing = [k for k in state if k not in own]
    if missing:
        raise RuntimeError(f"checkpoint holds tensors this model does not have: {missing[:5]}")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    absent = sorted(trainable - set(state))
    if absent:
        raise RuntimeError(f"checkpoint lacks trainable tensors {absent[:5]}: was it written by another method?")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
