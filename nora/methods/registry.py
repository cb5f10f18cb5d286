"""The registry of fine-tuning methods: one :class:`Method` per ``configs/method/<name>.yaml``.

A method is declared once, in a module of :mod:`nora.methods` (``full.py``, ``lora.py``, ``nora.py``,
``baselines.py``, or a new one: the package imports every module in it), with :func:`register_method`::

    register_method(Method("bitfit", "BitFit", apply_bitfit, families=("vision",), components=(("bias", ".bias"),)))

Everything that used to name methods reads it: the config check (:func:`method_for`), :func:`nora.methods.apply_method`
and its parameter report (``components``), the adapter check of a reloaded run (``adapter``), the result tables
(``label``, the order of registration), the demos (``uses_lora``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from nora.errors import UserError
from nora.methods.config import MethodConfig
from nora.models.config import FAMILIES, ModelFamily

SETTINGS = ("lora", "nora", "baseline")  # the MethodConfig blocks a method may read
ADAPTER_KINDS = ("trainable", "lora", "dora", "nora", "nora++", "peft")


@dataclass
class ApplyContext:
    """What a method's ``apply`` gets next to the model (which arrives with every parameter frozen)."""

    method: MethodConfig
    family: ModelFamily
    head: str | None  # the new classifier head that trains with the method (None: no head, or train_head=false)
    calibration_batches: Iterable | None = None  # NoRA's calibrated initialisation
    forward: Callable | None = None


def peft_common(ctx: ApplyContext) -> dict:
    """What every peft config a method builds takes besides its own settings: the new head, trained and saved whole
    (``modules_to_save``), and the model family's ``task_type``."""
    common = {}
    if ctx.head:
        common["modules_to_save"] = [ctx.head]
    if ctx.family.peft_task_type:
        common["task_type"] = ctx.family.peft_task_type
    return common


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: its ``configs/method/<name>.yaml`` (same ``name``) holds its settings.

    ``apply(model, ctx) -> (model, InjectionReport | None)`` makes the parameters it trains trainable (and may wrap
    the model, e.g. in peft). ``components``: ``(component, mark)`` pairs naming its trainable tensors in the
    parameter report (:func:`nora.adapter.parameter_report`; NoRA, LoRA and the head are told apart there).
    ``adapter``: the kind of adapter its run saves, as :func:`nora.app.adapters.adapter_identity` reports it
    (``trainable``: trainable.safetensors, ``peft``: peft's files of a tuner without LoRA or NoRA, ``lora``/``dora``:
    peft's LoRA files, ``nora``/``nora++``: a NoRA peft adapter). ``settings``: the blocks of its config it reads
    (a block it does not read must be null, one it reads must be set). ``head_lr``: whether its new head trains at
    a learning rate of its own (``trainer.head_lr``; False: full FT, where everything trains at one lr, and the
    linear probe, where the head is all that trains). ``lr_from``: the registered method whose tuned lr this one
    keeps for the factors they share in the demos' lr sweeps (NoRA++: LoRA's), which tune that method first."""

    name: str
    label: str  # in result tables and figures
    apply: Callable[[Any, ApplyContext], tuple]
    families: tuple[str, ...] = field(default_factory=lambda: tuple(FAMILIES))
    components: tuple[tuple[str, str], ...] = ()
    adapter: str = "trainable"
    settings: tuple[str, ...] = ()
    check: Callable[[MethodConfig], None] | None = None  # settings it needs beyond their schema (config time)
    head_lr: bool = True
    lr_from: str | None = None

    def __post_init__(self):
        for key, values, valid in (
            ("families", self.families, FAMILIES),
            ("settings", self.settings, SETTINGS),
            ("adapter", (self.adapter,), ADAPTER_KINDS),
        ):
            bad = [v for v in values if v not in valid]
            if bad:
                raise ValueError(f"method {self.name}: {key} {bad}; valid: {', '.join(valid)}")

    @property
    def uses_lora(self) -> bool:
        return "lora" in self.settings

    @property
    def uses_nora(self) -> bool:
        return "nora" in self.settings


METHODS: dict[str, Method] = {}  # by name, in the order of registration (the result tables' order)


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; a one-line :class:`UserError` listing the valid names otherwise."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def methods_for(family: str) -> tuple[str, ...]:
    """The methods that apply to a model family."""
    return tuple(name for name, m in METHODS.items() if family in m.families)


def methods_using(prop: str) -> tuple[str, ...]:
    """The names of the methods with ``prop`` (``"uses_lora"``, ``"uses_nora"``) true: tables select runs by it."""
    return tuple(name for name, m in METHODS.items() if getattr(m, prop))


def method_for(method_cfg: MethodConfig, family: str) -> Method:
    """The registered method of a typed ``method`` section, after checking it applies to ``family`` models and that
    its config sets exactly the blocks the method reads."""
    method = get_method(method_cfg.name)
    if family not in method.families:
        raise UserError(
            f"method={method.name} does not apply to {family} models; valid: " + ", ".join(methods_for(family))
        )
    for block in SETTINGS:
        if (getattr(method_cfg, block) is not None) != (block in method.settings):
            state = "needs" if block in method.settings else "does not read"
            raise UserError(f"method={method.name} {state} a method.{block} block (configs/method/{method.name}.yaml)")
    if method.check is not None:
        method.check(method_cfg)
    return method
