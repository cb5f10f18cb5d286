"""Data-parallel helpers: ``torchrun --nproc_per_node=N train.py ...`` (gloo on CPU, NCCL on CUDA).

Two strategies (``trainer.strategy``): ``ddp`` (:func:`wrap_ddp`, every rank holds the whole model; the
default when ``WORLD_SIZE > 1``) and ``fsdp`` (:func:`wrap_fsdp`, PyTorch's FSDP2 ``fully_shard``: every
parameter, gradient and optimizer state is sharded across ranks). Under FSDP the trainable parameters are
``DTensor`` shards: :func:`gather_trainable` turns them back into full tensors on every rank before rank 0
writes the adapter, and :mod:`nora.train.checkpoint` gathers/scatters them (and the optimizer state) itself.

Everything degrades to single-process no-ops when ``torch.distributed`` is not initialised.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as tdist

from nora.adapter.layer import GroupRational


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def slurm_env() -> bool:
    """Under SLURM through submitit (``hydra/launcher=slurm``: one task per GPU, no torchrun), export the
    variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from the job's
    SLURM variables. Returns True if it did; a no-op elsewhere, and when WORLD_SIZE is already set."""
    if (
        "WORLD_SIZE" in os.environ
        or os.environ.get("SUBMITIT_EXECUTOR") != "slurm"
        or int(os.environ.get("SLURM_NTASKS", "1")) <= 1
    ):
        return False
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def setup(device_type: str) -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1) or as several SLURM tasks
    by submitit (:func:`slurm_env`). Returns True if so."""
    if is_initialized():
        return True
    slurm_env()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend)
    return True


# what gloo and NCCL say when the rank at the other end of a collective is gone (killed, crashed, out of memory)
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker",
    "Broken pipe",
    "NCCL communicator was aborted",
    "ProcessGroupNCCL",
    "Connection refused",
)


def peer_lost(exc: BaseException) -> bool:
    """Whether ``exc``, raised in a collective of a multi-rank run, means another rank is gone (not a bug here)."""
    dist_error = getattr(tdist, "DistError", ())
    return world_size() > 1 and (isinstance(exc, dist_error) or any(s in str(exc) for s in _PEER_GONE))


def teardown() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not is_initialized():
        return t
    t = t.clone()
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / world_size()


def no_sync(module):
    """Skip the gradient sync on accumulation micro-steps: DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync(False)`` (a no-op for unwrapped modules)."""
    if not is_initialized():
        return nullcontext()
    if hasattr(module, "set_requires_gradient_sync"):
        return _fsdp_no_sync(module)
    return module.no_sync() if hasattr(module, "no_sync") else nullcontext()


@contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def wrap_ddp(model: torch.nn.Module, device: torch.device):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=False)


# ------------------------------------------------------------------------------------------------ FSDP
def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when ``model`` holds FSDP-sharded (``DTensor``) parameters."""
    return any(is_dtensor(p) for p in model.parameters())


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP wraps one by one: Hugging Face's ``_no_split_modules`` classes (decoder
    layers), else modules whose class name ends in ``DecoderLayer``/``Block``/``Layer`` inside a ModuleList."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        units = [c for lst in lists for c in lst if type(c).__name__.endswith(("DecoderLayer", "Block", "Layer"))]
    return units


def wrap_fsdp(
    model: torch.nn.Module,
    device: torch.device,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
):
    """Shard ``model`` in place across all ranks with FSDP2 ``fully_shard`` and return it.

    Groups, bottom-up: each NoRA/rational activation (its float32 coefficients are never cast, whatever
    ``param_dtype``), each decoder layer (:func:`shard_units`), then the root (embeddings, final norm, head).
    ``param_dtype`` (e.g. bf16) is the dtype parameters are all-gathered and computed in; gradients are
    reduced in float32. Frozen and trainable parameters may share a group (FSDP2 reduces only gradients
    that exist), and a group's trainable parameters must share one dtype: peft keeps LoRA/DoRA weights in
    float32 next to bf16 base weights, which FSDP2 all-gathers together. Every rank must hold identical
    weights before the call (same seed, same calibration): nothing is broadcast.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for m in model.modules():
        if isinstance(m, GroupRational) and any(True for _ in m.parameters(recurse=False)):
            fully_shard(m, mesh=mesh, mp_policy=MixedPrecisionPolicy(), reshard_after_forward=reshard_after_forward)
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def gather_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every FSDP-sharded trainable parameter by the full tensor, on every rank (a collective:
    all ranks must call it). For the end of training: the model can then be saved, plotted or evaluated
    by one rank, but not trained further under FSDP. A no-op when nothing is sharded."""
    if not is_sharded(model) and not any(hasattr(m, "reshard") for m in model.modules()):
        return model
    for mod in model.modules():  # every group back to its shards (the root may still hold gathered weights)
        if hasattr(mod, "reshard") and hasattr(mod, "set_requires_gradient_sync"):
            mod.reshard()
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.requires_grad and is_dtensor(p):
                mod._parameters[name] = torch.nn.Parameter(p.full_tensor().detach(), requires_grad=True)
    return model
