"""The ``method`` config group (``configs/method/*.yaml``, blocks in ``configs/adapter/``) as typed schemas.

A method is ``full`` (train every weight), ``lora`` (peft LoRA/DoRA settings or None), ``nora`` (NoRA
settings or None), ``baseline`` (settings of the other PEFT baselines, or None) and ``train_head``.
Learning rates are one value or ``{vision: .., causal_lm: ..}`` (:func:`nora.schema.per_family`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, List, Optional

from nora.adapter.config import NoraConfig
from nora.models.config import FAMILIES
from nora.schema import at_least, nested, one_of, positive, require


@dataclass
class LoraSettings:
    """peft ``LoraConfig`` settings; ``targets``: a list of module-name suffixes or one regex (peft)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: Any = None
    use_dora: bool = False

    def __post_init__(self):
        with nested("lora"):
            self._check()

    def _check(self):
        at_least("r", self.r, 1)
        positive("alpha", self.alpha)
        require(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")
        require(bool(self.targets), "targets", self.targets, "must name at least one module (model.lora_targets)")


@dataclass
class NoraSettings(NoraConfig):
    """The ``nora`` block of a method (``configs/adapter/nora.yaml``): the library's :class:`NoraConfig` (every field
    and check is its own) plus what a training run does around the injection."""

    calibration_batches: int = 4  # training batches recorded for init=calibrated
    agreement_prompts: int = 16  # causal LMs: validation prompts of the init-agreement check (0: off)

    def __post_init__(self):
        with nested("nora"):
            super().__post_init__()
            at_least("calibration_batches", self.calibration_batches, 1)
            at_least("agreement_prompts", self.agreement_prompts, 0)

    def nora_config(self, head: str | None) -> NoraConfig:
        """The adapter's own config; ``head`` stays trainable next to the NoRA factors."""
        own = {f.name: getattr(self, f.name) for f in fields(NoraConfig)}
        return NoraConfig(**{**own, "trainable_modules": [head] if head else []})


@dataclass
class BaselineSettings:
    """The low-budget baselines (:mod:`nora.methods.baselines`). Module lists (a list of name suffixes or one
    regex, peft's rule) may be given per family as ``{vision: .., causal_lm: ..}``; VeRA's settings are peft's."""

    kind: Optional[str] = None  # the method's name (the registered method decides what is applied)
    target_modules: Any = None  # ln_tuning, ia3, vera
    feedforward_modules: Any = None  # ia3: the targets scaled on their input
    r: int = 64  # vera: rank of the shared random matrices
    d_initial: float = 0.1  # vera: initial value of lambda_d
    dropout: float = 0.0  # vera
    projection_prng_key: int = 0  # vera: seed of the shared random matrices

    def __post_init__(self):
        with nested("baseline"):
            at_least("r", self.r, 1)
            positive("d_initial", self.d_initial)
            require(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")


@dataclass
class MethodConfig:
    name: str = "nora"
    families: List[str] = field(default_factory=lambda: list(FAMILIES))
    full: bool = False
    train_head: bool = True
    lora: Optional[LoraSettings] = None
    nora: Optional[NoraSettings] = None
    baseline: Optional[BaselineSettings] = None  # the low-budget baselines' settings (nora.methods.baselines)
    lr: Any = None  # one value or {vision: .., causal_lm: ..}
    head_lr: Any = None  # None: same as lr
    nora_lr: Any = None  # None: same as lr
    weight_decay: float = 0.0

    def __post_init__(self):
        for family in self.families:
            one_of("families", family, FAMILIES)
        require(
            self.baseline is None or self.baseline.kind in (None, self.name),
            "baseline.kind",
            self.baseline and self.baseline.kind,
            f"must be the method's name {self.name!r}",
        )
        require(
            not (self.full and (self.lora or self.nora or self.baseline)),
            "full",
            self.full,
            "full fine-tuning cannot be combined with lora/nora/baseline settings",
        )
        for key in ("lr", "head_lr", "nora_lr"):
            value = getattr(self, key)
            for v in value.values() if isinstance(value, dict) else [value]:
                require(
                    v is None or (isinstance(v, (int, float)) and v > 0),
                    key,
                    value,
                    "must be > 0 (one value or {vision: .., causal_lm: ..})",
                )
        at_least("weight_decay", self.weight_decay, 0.0)
