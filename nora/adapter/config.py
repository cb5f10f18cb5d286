"""Configuration of a NoRA-style activation adapter (one dataclass, serialisable to JSON)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from nora.errors import UserError
from nora.kernels import backend_names
from nora.rational.functional import FORMS
from nora.schema import at_least, is_int, is_number, one_of, positive, require

VARIANTS = ("nora", "rational_ft", "zero_init_ft", "frozen")
INITS = ("fit", "calibrated")
NUMERATOR_MODES = ("group", "shared")

# The default targets are found by kind, not by name (nora.adapter.discover: every known activation inside a
# feed-forward block). These name patterns match the same modules in timm ViTs (`blocks.N.mlp.act`) and dense HF
# decoders (`model.layers.N.mlp.act_fn`) only; `NoraConfig.targets` returns them for callers that match names.
DEFAULT_TARGETS = (r"(.*\.)?mlp\.act", r"(.*\.)?mlp\.act_fn")


class AdapterError(UserError, ValueError):
    """An adapter that does not fit the model or directory it is used with (a ValueError for library callers,
    a one-line UserError for the command-line tools)."""


def _pair(v, item) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(item(x) for x in v)


# field -> (test, what it must be): types are checked before ranges, so that groups="8" or r=2.5 is a one-line error
# naming the field (not a TypeError deep inside, nor "54" read as the degrees [5, 4])
FIELD_TYPES = {
    "r": (is_int, "must be an integer"),
    "alpha": (is_number, "must be a number"),
    "groups": (is_int, "must be an integer"),
    "degrees": (lambda v: _pair(v, is_int), "must be a list of two integers [m, n]"),
    "fit_range": (lambda v: _pair(v, is_number), "must be a list of two numbers [low, high]"),
    "calibration_range_weight": (is_number, "must be a number"),
    "per_group_calibration": (lambda v: isinstance(v, bool), "must be true or false"),
    "variant": (lambda v: isinstance(v, str), "must be a string"),
    "form": (lambda v: isinstance(v, str), "must be a string"),
    "numerator": (lambda v: isinstance(v, str), "must be a string"),
    "init": (lambda v: isinstance(v, str), "must be a string"),
    "backend": (lambda v: isinstance(v, str), "must be a string"),
    "target_modules": (
        lambda v: (
            v is None or isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v))
        ),
        "must be null, a regex or a list of regexes",
    ),
    "trainable_modules": (
        lambda v: v is None or (isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)),
        "must be a list of regexes",
    ),
}


def check_types(config) -> None:
    """The types of ``config``'s NoRA fields (:data:`FIELD_TYPES`): a ``ConfigValueError`` naming the first wrong
    one. Shared with :class:`nora.tuner.NoraPeftConfig`, which has the same fields."""
    for key, (ok, rule) in FIELD_TYPES.items():
        if hasattr(config, key):
            value = getattr(config, key)
            require(ok(value), key, value, rule)


def check_patterns(key: str, patterns) -> None:
    """Each of ``patterns`` compiles as a regex (``re.error`` becomes a ``ConfigValueError`` naming ``key``)."""
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            require(False, key, p, f"not a valid regex ({exc})")


@dataclass
class NoraConfig:
    """How activations are replaced and adapted.

    variant
        ``nora`` (default): frozen base rational + low-rank per-group coefficient deltas
        ``(alpha/r) B A`` (A Kaiming-uniform, B zero), 2r(G+5) parameters per activation at (5,4).
        ``rational_ft``: the per-group coefficients themselves are trained (paper ablation).
        ``zero_init_ft``: a zero-initialised full per-group additive delta (paper ablation).
        ``frozen``: swap in the fitted rational without trainable parameters.
    numerator
        ``group``: the numerator update is per group (B_N is G x r); ``shared``: one numerator update
        for all groups (B_N is 1 x r; for ``rational_ft``/``zero_init_ft`` one shared row).
        The denominator update is always per group.
    residual
        ``True`` (default): the activation computes ``phi(x) + (R_{theta+Delta}(x) - R_theta(x))``, the original
        activation ``phi`` plus the change of its fitted rational ``R_theta``: step 0 (and a disabled adapter) is
        exactly the original model on inputs of any range, and the update is NoRA's. ``False``: the paper's form,
        ``R_{theta+Delta}(x)`` replaces the activation (equal to it only as far as the fit reaches: see
        ``docs/method.md``, "Forms").
    init
        ``fit``: fit once to the original activation over ``fit_range``; ``calibrated``: record each
        target's real inputs on calibration batches and fit over them (``per_group_calibration``
        fits each channel group separately).
    target_modules
        Regexes matched in full against canonical module names (peft's prefix and ``base_layer`` segments
        removed). Default ``None``: every activation of a known kind inside a feed-forward block (dense, gated,
        MoE experts and shared experts; see :mod:`nora.adapter.discover`).
    trainable_modules
        Regexes of extra modules left trainable (e.g. ``["head"]`` for a new classifier head), saved with the
        adapter; on a peft-wrapped model too (an unknown name raises; a module in peft's ``modules_to_save`` is
        refused). BatchNorm layers not listed here have their running statistics frozen.
    """

    # every field of NoRA is declared here once: nora.tuner.NoraPeftConfig and the Hydra settings (NoraSettings,
    # registered as configs' adapter/nora_defaults) take their defaults and help from these lines
    variant: str = field(default="nora", metadata={"help": "nora | rational_ft | zero_init_ft | frozen"})
    r: int = field(default=3, metadata={"help": "rank of the coefficient update"})
    alpha: float = field(default=6.0, metadata={"help": "the update is scaled by alpha / r"})
    groups: int = field(default=8, metadata={"help": "channel groups per activation"})
    degrees: tuple[int, int] = field(default=(5, 4), metadata={"help": "[numerator m, denominator n]"})
    form: str = field(default="A", metadata={"help": "safe denominator form A or B"})
    numerator: str = field(default="group", metadata={"help": "group | shared numerator update"})
    residual: bool = field(
        default=True,
        metadata={
            "help": "true: phi(x) + R_theta+Delta(x) - R_theta(x), exactly the original model at step 0; false: the "
            "paper's form, the rational replaces the activation"
        },
    )
    init: str = field(default="fit", metadata={"help": "fit | calibrated (fit each layer over its recorded inputs)"})
    fit_range: tuple[float, float] = field(
        default=(-3.0, 3.0), metadata={"help": "[low, high]: the range the base rational is fitted over"}
    )
    calibration_range_weight: float = field(
        default=0.1, metadata={"help": "calibrated init: weight of the fit range next to the recorded inputs"}
    )
    per_group_calibration: bool = field(
        default=False, metadata={"help": "calibrated init: fit each channel group over its own inputs"}
    )
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "activations to replace: regexes matched in full (None: nora's defaults)"}
    )
    trainable_modules: list[str] = field(
        default_factory=list, metadata={"help": "regexes of extra modules left trainable (e.g. a new head)"}
    )
    backend: str = field(default="auto", metadata={"help": "kernel backend of the rational"})

    def __post_init__(self) -> None:
        check_types(self)
        self.degrees = tuple(int(d) for d in self.degrees)  # type: ignore[assignment]
        self.fit_range = tuple(float(v) for v in self.fit_range)  # type: ignore[assignment]
        self.trainable_modules = list(self.trainable_modules or [])
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
        check_patterns("target_modules", self.target_modules or [])
        check_patterns("trainable_modules", self.trainable_modules)
        one_of("variant", self.variant, VARIANTS)
        one_of("form", self.form, FORMS)
        one_of("numerator", self.numerator, NUMERATOR_MODES)
        one_of("init", self.init, INITS)
        require(isinstance(self.residual, bool), "residual", self.residual, "must be true or false")
        one_of("backend", self.backend, ("auto", *backend_names()))
        at_least("r", self.r, 1)
        positive("alpha", self.alpha)
        require(math.isfinite(self.alpha), "alpha", self.alpha, "must be finite")
        at_least("groups", self.groups, 1)
        require(
            len(self.degrees) == 2 and self.degrees[0] >= 0 and self.degrees[1] >= 1,
            "degrees",
            list(self.degrees),
            "must be [m >= 0, n >= 1]",
        )
        require(
            len(self.fit_range) == 2 and self.fit_range[0] < self.fit_range[1],
            "fit_range",
            list(self.fit_range),
            "must be [low, high] with low < high",
        )
        at_least("calibration_range_weight", self.calibration_range_weight, 0.0)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def targets(self) -> list[str]:
        return list(self.target_modules) if self.target_modules is not None else list(DEFAULT_TARGETS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["degrees"] = list(self.degrees)
        d["fit_range"] = list(self.fit_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NoraConfig":
        """A saved config (``to_dict``). One saved before the residual form existed has no ``residual``: it was
        trained in the paper's form, and loads so."""
        d = {"residual": False, **d}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown NoraConfig field(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)
