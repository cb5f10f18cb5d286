"""Atomic checkpoints with everything needed to continue a run exactly where it stopped.

Under FSDP (sharded ``DTensor`` parameters) the trainable tensors and their optimizer state are gathered into
full tensors for the file by torch's distributed checkpoint state-dict API (``get_model_state_dict`` /
``get_optimizer_state_dict`` with ``full_state_dict`` and ``cpu_offload``: one tensor at a time, onto rank 0's CPU,
frozen weights left out), so no rank ever holds the whole model or optimizer state on its device (every rank must
take part: :func:`gather_training_state`). On load each rank cuts its shard from the full tensors. A checkpoint
has the same layout whatever the strategy or the number of ranks.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nora.adapter.layer import GroupRational
from nora.errors import NonFiniteLossError, UserError
from nora.files import atomic_write
from nora.train import distributed as dist
from nora.train.distributed import is_dtensor, is_sharded


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then ``os.replace`` onto ``path``.

    A crash or kill during the write leaves the previous file untouched (and at worst a stray
    ``.tmp`` file, removed by the next successful save). The file is written through a Python file object so
    that a full disk raises an ``OSError`` with its errno (torch's own writer reports it as an opaque
    ``RuntimeError``), which :func:`nora.files.atomic_path` turns into one line naming ``path``.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    atomic_write(path, write)


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "state")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint in ``path``; a file torch cannot read (truncated, overwritten, another format) is a
    one-line :class:`UserError` with the path and how to start afresh, not an unpickling traceback."""
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # truncated zip, random bytes, pickle of something else: all mean "unreadable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {reason[:200]}); delete it or "
            "run with resume=null to start this run afresh"
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(
            f"{path} is not a nora checkpoint (no {', '.join(missing)}); delete it or run with "
            "resume=null to start this run afresh"
        )
    return ckpt


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` (nested dicts too) holding NaN or Inf."""
    bad = []
    for name, t in tensors.items():
        if isinstance(t, dict):
            bad += [f"{name}.{n}" for n in nonfinite_tensors(t)]
        elif torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(str(name))
    return bad


def check_finite(model_state: dict, optimizer_state: dict, step: int, path: Path) -> None:
    """A checkpoint never holds non-finite weights or optimizer moments: a diverging run stops here, keeping
    the last good checkpoint, instead of replacing it with one no resume can recover from."""
    bad = nonfinite_tensors(model_state) + [f"optimizer state {n}" for n in nonfinite_tensors(optimizer_state["state"])]
    if bad:
        kept = path if path.exists() else "none written yet"
        raise NonFiniteLossError(
            f"non-finite weights at step {step} ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); stopped "
            f"without overwriting the last good checkpoint ({kept}); lower the learning rate"
        )


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


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor().detach() if is_dtensor(t) else t.detach().clone()


def training_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What changes during training: every trainable parameter plus the NoRA activations' buffers
    (their fitted base coefficients), keyed by parameter name. Frozen pretrained weights are rebuilt
    from the model config on resume and are not stored. FSDP shards are gathered (a collective: every
    rank must call it)."""
    out = {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}
    for mname, mod in model.named_modules():
        if isinstance(mod, GroupRational):
            for bname, b in mod.named_buffers(recurse=False):
                out[f"{mname}.{bname}"] = b.detach().clone()
    return out


def load_training_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike = "checkpoint"
) -> None:
    """Copy a checkpoint's training state (:func:`training_state_dict`) into ``model``. A checkpoint of another
    method or model (other tensor names, other shapes) is a :class:`UserError` naming ``source`` and what differs,
    raised before any tensor is copied (the model is left as it was)."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    way_out = (
        "was it written by another method or model? resume from a checkpoint of this configuration, or resume=null"
    )
    missing = [k for k in state if k not in own]
    if missing:
        raise UserError(
            f"{source} holds tensors this model does not have ({', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}): {way_out}"
        )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    absent = sorted(trainable - set(state))
    if absent:
        raise UserError(
            f"{source} lacks trainable tensors of this model ({', '.join(absent[:3])}"
            f"{' ...' if len(absent) > 3 else ''}): {way_out}"
        )
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]  # a DTensor's shape is the full one
    if shapes:
        raise UserError(f"{source}: tensors of other shapes than this model's ({'; '.join(shapes[:2])}): {way_out}")

    if is_sharded(model):  # FSDP: torch's state-dict API cuts each full tensor into this rank's shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(
            model,
            {k: v.to(own[k].dtype) for k, v in state.items()},
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        return
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a (full) optimizer state dict, cutting the state of FSDP-sharded parameters into this rank's shards."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(is_dtensor(p) for p in params):
        from torch.distributed.tensor import distribute_tensor

        state = {}
        for i, s in sd["state"].items():
            p = params[int(i)]
            if is_dtensor(p):
                s = {
                    k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape)
                    else v
                    for k, v in s.items()
                }
            state[i] = s
        sd = {**sd, "state": state}
    optimizer.load_state_dict(sd)


def _training_keys(model: nn.Module) -> set[str]:
    """The names :func:`training_state_dict` stores: trainable parameters and NoRA activations' buffers."""
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    for mname, mod in model.named_modules():
        if isinstance(mod, GroupRational):
            keys.update(f"{mname}.{b}" for b, _ in mod.named_buffers(recurse=False))
    return keys


def _gather_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict] | None:
    """FSDP: the full training state on rank 0's CPU through torch's state-dict API (a collective; None off rank
    0), in the layout of an unsharded checkpoint (optimizer state keyed by parameter index, as
    ``optimizer.state_dict()``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    to_rank0_cpu = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_state = get_model_state_dict(model, options=to_rank0_cpu)
    optim_state = get_optimizer_state_dict(model, optimizer, options=to_rank0_cpu)  # keyed by parameter name
    if dist.rank() != 0:
        return None
    keep = _training_keys(model)
    model_state = {k: v for k, v in model_state.items() if k in keep}
    name_of = {id(p): n for n, p in model.named_parameters()}
    order = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    by_index = {i: optim_state["state"][n] for i, n in enumerate(order) if n in optim_state["state"]}
    groups = [{k: v for k, v in g.items()} for g in optimizer.state_dict()["param_groups"]]  # hyper-parameters
    return model_state, {"state": by_index, "param_groups": groups}


def gather_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict] | None:
    """``(training_state_dict, optimizer_state_dict)`` on rank 0, None elsewhere. Under FSDP every rank must
    call it (the shards are gathered to rank 0's CPU); otherwise only rank 0 does any work."""
    if dist.is_sharded(model):
        return _gather_sharded_state(model, optimizer)
    if dist.rank() != 0:
        return None
    return training_state_dict(model), optimizer.state_dict()
