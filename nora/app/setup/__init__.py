"""What ``run_training`` trains, per model family: one :class:`TrainSetup`, built by :func:`build_setup` from
:mod:`nora.app.setup.vision` or :mod:`nora.app.setup.causal_lm` (each builds data before the model, so a missing
dataset fails before any weights are loaded or downloaded)."""

from __future__ import annotations

import torch

from nora.app.config import RunConfig
from nora.app.setup.causal_lm import causal_lm_setup
from nora.app.setup.train_setup import TrainSetup
from nora.app.setup.vision import vision_setup

__all__ = ["SETUPS", "TrainSetup", "build_setup"]


# the setup of each model family (nora.models.config.FAMILIES; tests/test_registry.py keeps them equal)
SETUPS = {"vision": vision_setup, "causal_lm": causal_lm_setup}


def build_setup(run: RunConfig, device: torch.device, world_size: int, rank: int) -> TrainSetup:
    return SETUPS[run.family](run, device, world_size, rank)
