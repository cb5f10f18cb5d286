"""What one run trains, whatever the model family: the :class:`TrainSetup` a family's setup builds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from nora.train.loop import TrainData
from nora.train.tasks import Task


@dataclass
class TrainSetup:
    model: nn.Module  # the base model, before the method is applied
    task: Task  # the loss, the metric and the units counted
    data: TrainData  # datasets, batch samplers, how batches are made
    calibration: list | None = None  # input batches for NoRA's calibrated initialisation
    forward: Callable | None = None  # how a calibration batch runs through the model (None: model(x))
    head: str | None = None  # the new classifier head that trains with every method
    wrap: Callable[[nn.Module], nn.Module] | None = None  # DDP / FSDP around the method-applied model
    agreement_batches: list = field(default_factory=list)  # held-out batches for the NoRA init-agreement check
    agreement_split: str = "val"
    extra: dict = field(default_factory=dict)  # this family's keys of summary.json
