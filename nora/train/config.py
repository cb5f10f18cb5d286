"""The ``trainer`` config group (``configs/trainer/default.yaml``) as a typed, checked schema.

The YAML file documents and sets the values; this class fixes their types, ranges and choices (checked when the
config is loaded, before any model or data is touched) and holds the default of a key a YAML file leaves out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional

from nora.schema import at_least, one_of, positive, require

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DATA_PATHS = ("auto", "batched", "per_sample")
STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class TrainerConfig:
    device: str = "auto"
    precision: str = "auto"
    epochs: int = 10
    max_steps: Optional[int] = None
    batch_size: int = 64
    eval_batch_size: int = 256
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: Optional[float] = None  # None: the method's default for the model family
    head_lr: Optional[float] = None
    nora_lr: Optional[float] = None
    weight_decay: Optional[float] = None
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = 1.0  # None or 0: off
    num_workers: int = 2
    data_path: str = "auto"
    log_every: int = 20
    eval_every: int = 1  # 0: only at the end
    checkpoint_every: int = 200  # 0: only at epoch ends
    progress: bool = True
    compile: bool = False
    strategy: str = "auto"
    fsdp_reshard_after_forward: bool = True
    stop_after_steps: Optional[int] = None

    def __post_init__(self):
        self._check_choices()
        self._check_schedule()
        for key in ("batch_size", "eval_batch_size", "grad_accum", "log_every"):
            at_least(key, getattr(self, key), 1)
        for key in ("num_workers", "eval_every", "checkpoint_every"):
            at_least(key, getattr(self, key), 0)
        for key in ("lr", "head_lr", "nora_lr"):
            positive(key, getattr(self, key), allow_none=True)
        at_least("weight_decay", self.weight_decay, 0.0, allow_none=True)
        at_least("grad_clip", self.grad_clip, 0.0, allow_none=True)
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            list(self.betas),
            "must be two values in [0, 1)",
        )
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")

    def _check_choices(self):
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        one_of("scheduler", self.scheduler, SCHEDULERS)
        one_of("precision", self.precision, PRECISIONS)
        one_of("data_path", self.data_path, DATA_PATHS)
        one_of("strategy", str(self.strategy).lower(), STRATEGIES)
        require(
            self.device in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", self.device) is not None,
            "device",
            self.device,
            "valid: auto, cpu, cuda, cuda:N, mps",
        )

    def _check_schedule(self):
        if self.max_steps is None:
            at_least("epochs", self.epochs, 1)
        else:
            at_least("max_steps", self.max_steps, 1)
        at_least("warmup_steps", self.warmup_steps, 0, allow_none=True)
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        at_least("stop_after_steps", self.stop_after_steps, 1, allow_none=True)
