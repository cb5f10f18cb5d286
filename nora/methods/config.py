"""The ``method`` config group (``configs/method/*.yaml``, blocks in ``configs/adapter/``) as typed schemas.

A method is ``full`` (train every weight), ``lora`` (peft LoRA/DoRA settings or None), ``nora`` (NoRA
settings or None), ``baseline`` (settings of the other PEFT baselines, or None) and ``train_head``.
Learning rates are one value or ``{vision: .., causal_lm: ..}`` (:func:`nora.config.per_family`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from nora.models import FAMILIES
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
class NoraSettings:
    """:class:`nora.adapter.NoraConfig` settings plus what the training run does around the injection."""

    variant: str = "nora"
    r: int = 3
    alpha: float = 6.0
    groups: int = 8
    degrees: List[int] = field(default_factory=lambda: [5, 4])
    form: str = "A"
    numerator: str = "group"
    init: str = "fit"                     # fit | calibrated
    fit_range: List[float] = field(default_factory=lambda: [-3.0, 3.0])
    calibration_batches: int = 4          # training batches recorded for init=calibrated
    calibration_range_weight: float = 0.1
    per_group_calibration: bool = False
    targets: Optional[List[str]] = None   # None: nora.adapter's DEFAULT_TARGETS
    backend: str = "auto"
    agreement_prompts: int = 16           # causal LMs: validation prompts of the init-agreement check (0: off)

    def __post_init__(self):
        with nested("nora"):
            self._check()

    def _check(self):
        from nora.adapter.config import INITS, NUMERATOR_MODES, VARIANTS
        from nora.rational.functional import FORMS

        one_of("variant", self.variant, VARIANTS)
        one_of("form", self.form, FORMS)
        one_of("numerator", self.numerator, NUMERATOR_MODES)
        one_of("init", self.init, INITS)
        at_least("r", self.r, 1)
        positive("alpha", self.alpha)
        at_least("groups", self.groups, 1)
        require(len(self.degrees) == 2 and self.degrees[0] >= 0 and self.degrees[1] >= 1, "degrees",
                list(self.degrees), "must be [m >= 0, n >= 1]")
        require(len(self.fit_range) == 2 and self.fit_range[0] < self.fit_range[1], "fit_range",
                list(self.fit_range), "must be [low, high] with low < high")
        at_least("calibration_batches", self.calibration_batches, 1)
        at_least("calibration_range_weight", self.calibration_range_weight, 0.0)
        at_least("agreement_prompts", self.agreement_prompts, 0)
        self._check_backend()

    def _check_backend(self):
        from nora.kernels import backend_names

        one_of("backend", self.backend, ("auto", *backend_names()))

    def nora_config(self, head: str | None):
        """The adapter's own config; ``head`` stays trainable next to the NoRA factors."""
        from nora.adapter import NoraConfig

        return NoraConfig(
            variant=self.variant, r=self.r, alpha=self.alpha, groups=self.groups, degrees=tuple(self.degrees),
            form=self.form, numerator=self.numerator, init=self.init, fit_range=tuple(self.fit_range),
            calibration_range_weight=self.calibration_range_weight, per_group_calibration=self.per_group_calibration,
            target_modules=list(self.targets) if self.targets else None,
            trainable_modules=[head] if head else [], backend=self.backend)


BASELINE_KINDS = ("bitfit", "ln_tuning", "ia3", "vera")


@dataclass
class BaselineSettings:
    """The low-budget baselines (:mod:`nora.methods.baselines`). Module lists (a list of name suffixes or one
    regex, peft's rule) may be given per family as ``{vision: .., causal_lm: ..}``; VeRA's settings are peft's."""

    kind: str = "bitfit"                   # bitfit | ln_tuning | ia3 | vera
    target_modules: Any = None             # ln_tuning, ia3, vera
    feedforward_modules: Any = None        # ia3: the targets scaled on their input
    r: int = 64                            # vera: rank of the shared random matrices
    d_initial: float = 0.1                 # vera: initial value of lambda_d
    dropout: float = 0.0                   # vera
    projection_prng_key: int = 0           # vera: seed of the shared random matrices

    def __post_init__(self):
        with nested("baseline"):
            one_of("kind", self.kind, BASELINE_KINDS)
            require(self.kind == "bitfit" or bool(self.target_modules), "target_modules", self.target_modules,
                    f"must name at least one module for {self.kind}")
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
    lr: Any = None          # one value or {vision: .., causal_lm: ..}
    head_lr: Any = None     # None: same as lr
    nora_lr: Any = None     # None: same as lr
    weight_decay: float = 0.0

    def __post_init__(self):
        for family in self.families:
            one_of("families", family, FAMILIES)
        require(not (self.full and (self.lora or self.nora or self.baseline)), "full", self.full,
                "full fine-tuning cannot be combined with lora/nora/baseline settings")
        for key in ("lr", "head_lr", "nora_lr"):
            value = getattr(self, key)
            for v in (value.values() if isinstance(value, dict) else [value]):
                require(v is None or (isinstance(v, (int, float)) and v > 0), key, value,
                        "must be > 0 (one value or {vision: .., causal_lm: ..})")
        at_least("weight_decay", self.weight_decay, 0.0)


def nora_groups_message(groups: int, width: int, where: str) -> str:
    divisors = [g for g in range(1, min(width, 64) + 1) if width % g == 0]
    return (f"method.nora.groups={groups} does not divide the MLP width {width} of {where}; "
            f"use a divisor, e.g. {', '.join(map(str, divisors[-6:]))}")
