"""Data-parallel helpers: ``torchrun --nproc_per_node=N train.py ...`` (DDP; gloo on CPU, NCCL on CUDA).

Everything degrades to single-process no-ops when ``torch.distributed`` is not initialised.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as tdist


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def setup(device_type: str) -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1). Returns True if so."""
    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend)
    return True


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
    """DDP's gradient-sync skip for accumulation micro-steps (a no-op for unwrapped modules)."""
    return module.no_sync() if hasattr(module, "no_sync") and is_initialized() else nullcontext()


def wrap_ddp(model: torch.nn.Module, device: torch.device):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=False)
