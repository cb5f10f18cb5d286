"""What ``run_training`` trains, per model family: one :class:`TrainSetup`, built by :func:`build_setup` from
``nora.setup.vision`` or ``nora.setup.causal_lm`` (each builds data before the model, so a missing dataset fails
before any weights are loaded or downloaded)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from nora.config import RunConfig
from nora.train.tasks import Task


@dataclass
class TrainSetup:
    model: nn.Module                       # the base model, before the method is applied
    task: Task                             # the loss, the metric and the units counted
    train_set: Any
    eval_set: Any
    train_sampler: Any                     # batch samplers (set_epoch / set_start / len)
    eval_sampler: Any
    collate_fn: Callable | None = None
    loader_factory: Callable | None = None  # (dataset, sampler, epoch, train) -> batches; None: a DataLoader
    calibration: list | None = None        # input batches for NoRA's calibrated initialisation
    forward: Callable | None = None        # how a calibration batch runs through the model (None: model(x))
    head: str | None = None                # the new classifier head that trains with every method
    wrap: Callable[[nn.Module], nn.Module] | None = None  # DDP / FSDP around the method-applied model
    agreement_batches: list = field(default_factory=list)  # held-out batches for the NoRA init-agreement check
    agreement_split: str = "val"
    extra: dict = field(default_factory=dict)  # this family's keys of summary.json


def build_setup(run: RunConfig, device: torch.device, world_size: int, rank: int) -> TrainSetup:
    if run.family == "vision":
        from nora.setup.vision import vision_setup

        return vision_setup(run, device, world_size, rank)
    from nora.setup.causal_lm import causal_lm_setup

    return causal_lm_setup(run, device, world_size, rank)
