"""``NoraPeftConfig``: NoRA (and NoRA++) as a peft method, ``peft_type`` ``NORA``.

One config, one adapter: the NoRA part (the fields of :class:`nora.NoraConfig`: rational activations with a
low-rank update of their coefficients) and, with ``lora_r > 0``, a LoRA/DoRA part on the linear layers (peft's own
LoRA layers, configured by the ``lora_*`` fields). ``lora_r=0`` is NoRA, ``lora_r>0`` is NoRA++.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from nora.adapter.config import NoraConfig, check_patterns, check_types
from nora.adapter.peft_format import LORA_PART_DEFAULTS
from nora.schema import is_int, is_number, require

NORA = "NORA"


def extend_peft_type(name: str = NORA) -> PeftType:
    """Add ``name`` to peft's ``PeftType`` (a ``str`` enum), as third-party methods do with ``aenum.extend_enum``;
    the standard library has no public way, so the member is built and entered into the enum's own tables.
    Idempotent."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    if name not in PeftType.__dict__:
        type.__setattr__(PeftType, name, member)
    return member


extend_peft_type()


NORA_DEFAULTS = {f.name: f for f in dataclasses.fields(NoraConfig)}


def nora_field(name: str, help: str | None = None, **default):
    """NoraPeftConfig's field for NoraConfig's field ``name``: its default (a tuple as a list, as JSON keeps it) and
    help, unless given."""
    f = NORA_DEFAULTS[name]
    metadata = {"help": help or f.metadata.get("help", "")}
    if default:
        return field(default=default["default"], metadata=metadata)
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=metadata)
    if isinstance(f.default, tuple):
        return field(default_factory=lambda d=f.default: list(d), metadata=metadata)
    return field(default=f.default, metadata=metadata)


def peft_field(name: str, help: str = ""):
    """NoraPeftConfig's field ``name`` beyond NoraConfig's: its default from
    :data:`nora.adapter.peft_format.LORA_PART_DEFAULTS` (immutable: None, numbers, booleans)."""
    return field(default=LORA_PART_DEFAULTS[name], metadata={"help": help} if help else {})


def _names(v) -> bool:
    return isinstance(v, (list, tuple, set)) and all(isinstance(x, str) for x in v)


_LORA_TYPES = (
    ("lora_r", is_int, "must be an integer (0: NoRA alone)"),
    ("lora_alpha", is_number, "must be a number"),
    ("lora_dropout", lambda v: is_number(v) and 0 <= v < 1, "must be a number in [0, 1)"),
    ("use_dora", lambda v: isinstance(v, bool), "must be true or false"),
    ("residual", lambda v: isinstance(v, bool), "must be true or false"),
    (
        "lora_target_modules",
        lambda v: v is None or isinstance(v, str) or _names(v),
        'must be null, a regex, "all-linear" or a list of module names',
    ),
    ("lora_extra", lambda v: v is None or isinstance(v, dict), "must be null or a dict of LoraConfig fields"),
    ("modules_to_save", lambda v: v is None or _names(v), "must be null or a list of module names"),
    (
        "layer_specs",
        lambda v: v is None or (isinstance(v, dict) and all(isinstance(s, dict) for s in v.values())),
        "must be null or a dict of module name -> its recorded width, layout and original activation",
    ),
)


@dataclass
class NoraPeftConfig(PeftConfig):
    """NoRA / NoRA++ for ``peft.get_peft_model``.

    NoRA part (as :class:`nora.NoraConfig`): ``variant``, ``r``, ``alpha``, ``groups``, ``degrees``, ``form``,
    ``numerator``, ``residual`` (default true: step 0 is exactly the original model), ``init`` (``fit``;
    ``calibrated``: call ``nora.calibrate(peft_model, batches)`` after ``get_peft_model``), ``fit_range``,
    ``calibration_range_weight``, ``per_group_calibration``, ``backend``;
    ``target_modules``: the activations, regexes matched in full against module names (``None``: nora's default
    targets, the activation inside each transformer MLP).

    LoRA part (NoRA++, peft's LoRA/DoRA layers): ``lora_r`` (0: no LoRA), ``lora_alpha``, ``lora_dropout``,
    ``lora_target_modules`` (as ``peft.LoraConfig.target_modules``: names, a regex, ``"all-linear"``, or ``None``
    for peft's default for the model type), ``use_dora``.

    ``modules_to_save``: extra modules trained and saved whole (e.g. a new classifier head), as in every peft
    method.
    """

    # the NoRA part: NoraConfig's fields, defaults and help (nora_field); trainable_modules is peft's modules_to_save
    variant: str = nora_field("variant")
    r: int = nora_field("r")
    alpha: float = nora_field("alpha")
    groups: int = nora_field("groups")
    degrees: list[int] = nora_field("degrees")
    form: str = nora_field("form")
    numerator: str = nora_field("numerator")
    # None: NoraConfig's default for a new config; a saved config without the field predates the residual form and
    # loads as false, the form it was trained in (__post_init__)
    residual: Optional[bool] = nora_field("residual", default=None)
    init: str = nora_field("init", help="fit | calibrated (then nora.calibrate(model, batches))")
    fit_range: list[float] = nora_field("fit_range")
    calibration_range_weight: float = nora_field("calibration_range_weight")
    per_group_calibration: bool = nora_field("per_group_calibration")
    backend: str = nora_field("backend")
    target_modules: Optional[Union[list[str], str]] = nora_field("target_modules")
    # the LoRA part and nora's records: defaults declared in nora.adapter.peft_format (the core install writes them)
    lora_r: int = peft_field("lora_r", help="LoRA rank; 0: NoRA alone, > 0: NoRA++")
    lora_alpha: float = peft_field("lora_alpha")
    lora_dropout: float = peft_field("lora_dropout")
    lora_target_modules: Optional[Union[list[str], str]] = peft_field(
        "lora_target_modules", help="as LoraConfig.target_modules (None: peft's default for the model type)"
    )
    use_dora: bool = peft_field("use_dora")
    lora_extra: Optional[dict] = peft_field(
        "lora_extra",
        help="any other peft.LoraConfig field of the LoRA part (target_parameters, rank_pattern, alpha_pattern, "
        "exclude_modules, bias, ...)",
    )
    modules_to_save: Optional[list[str]] = peft_field("modules_to_save")
    layer_specs: Optional[dict] = peft_field(
        "layer_specs",
        help="written by nora when the adapter is built: per activation (module name) its width, channel_dim, the "
        "original activation and how its base rational was initialised (fit | calibrated); checked against the "
        "model at load time",
    )

    def __post_init__(self) -> None:
        # peft_type arrives set only from a saved adapter_config.json (PeftConfig.from_peft_type)
        self.__dict__["_loaded"] = self.peft_type is not None
        if self.residual is None:
            # one without `residual` predates the form
            self.residual = NORA_DEFAULTS["residual"].default if self.peft_type is None else False
        check_types(self)
        for key, ok, rule in _LORA_TYPES:
            value = getattr(self, key)
            require(ok(value), key, value, rule)
        if isinstance(self.lora_target_modules, str) and self.lora_target_modules != "all-linear":
            check_patterns("lora_target_modules", [self.lora_target_modules])
        super().__post_init__()
        self.peft_type = PeftType.NORA
        self.degrees = [int(d) for d in self.degrees]
        self.fit_range = [float(v) for v in self.fit_range]
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        elif self.target_modules is not None:
            self.target_modules = list(self.target_modules)
        if isinstance(self.lora_target_modules, (set, tuple)):
            self.lora_target_modules = sorted(self.lora_target_modules)
        if self.lora_r < 0:
            raise ValueError(f"lora_r={self.lora_r}: must be >= 0 (0: NoRA alone, > 0: NoRA++)")
        self.nora_config()  # NoraConfig's checks: one set of fields and ranges

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """peft's ``PeftConfig.from_pretrained``; a config read from a local folder remembers it (:attr:`source`), so
        that the tuner checks the folder's weights against the model before it changes the model."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        path = Path(pretrained_model_name_or_path) / (subfolder or "")
        if isinstance(config, NoraPeftConfig) and path.is_dir():
            config.__dict__["_source"] = path
        return config

    @property
    def source(self) -> Optional[Path]:
        """The local folder this config was read from (by ``from_pretrained``), else None."""
        return self.__dict__.get("_source")

    @property
    def loaded(self) -> bool:
        """Read from a saved ``adapter_config.json`` (not built in this process)."""
        return bool(self.__dict__.get("_loaded"))

    @property
    def target_parameters(self) -> list[str]:
        """The LoRA part's ``target_parameters`` (peft's injection reads them off the config it injects)."""
        return list((self.lora_extra or {}).get("target_parameters") or []) if self.lora_r else []

    @property
    def is_nora_pp(self) -> bool:
        return self.lora_r > 0

    def nora_config(self) -> NoraConfig:
        """The NoRA part as the library's :class:`nora.NoraConfig` (validated there)."""
        return NoraConfig(**{name: getattr(self, name) for name in NORA_DEFAULTS if name != "trainable_modules"})

    def lora_config(self):
        """The LoRA part as a ``peft.LoraConfig`` (``None`` without one): what peft's LoRA layers are built from."""
        if not self.lora_r:
            return None
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
            use_dora=self.use_dora,
            inference_mode=self.inference_mode,
            task_type=self.task_type,
            **(self.lora_extra or {}),
        )
