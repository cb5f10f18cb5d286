"""Fine-tuning methods: which parameters train, and which adapters are added.

Every method is described by its config (``configs/method/*.yaml``, typed by
:class:`nora.methods.config.MethodConfig`) with the fields ``full`` (train every weight), ``lora`` (peft
LoRA/DoRA settings or null), ``nora`` (NoRA settings or null) and ``train_head``; :func:`apply_method` turns
that into the model to train:

=============  ====================================================================
full           every weight (and the new head)
linear_probe   only the new head
lora / dora    peft LoRA / DoRA on ``lora.targets`` (+ the head via ``modules_to_save``)
nora           NoRA activations (+ the head)
nora_pp        peft LoRA + NoRA, trained jointly (+ the head)
rational_ft    NoRA activations with variant ``rational_ft`` (ablation)
zero_init_ft   NoRA activations with variant ``zero_init_ft`` (ablation)
bitfit, ...    low-budget baselines under ``baseline:`` (bitfit, ln_tuning, ia3, vera): nora/methods/baselines.py
=============  ====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from torch import nn

from nora.adapter import InjectionReport, ParameterReport, apply_nora, parameter_report
from nora.adapter.inject import activation_width, find_targets
from nora.adapter.validate import lora_target_problems
from nora.errors import UserError
from nora.methods.baselines import apply_baseline
from nora.methods.config import MethodConfig, nora_groups_message
from nora.models.config import ModelConfig, as_model_config
from nora.schema import load

METHODS = (
    "full",
    "linear_probe",
    "lora",
    "dora",
    "nora",
    "nora_pp",
    "rational_ft",
    "zero_init_ft",
    "bitfit",
    "ln_tuning",
    "ia3",
    "vera",
)
VISION_ONLY = ("linear_probe", "bitfit")  # a new classifier head / bias terms: LLaMA-style decoders have neither


def methods_for(family: str) -> tuple[str, ...]:
    """The methods that apply to a model family (configs/method/*.yaml ``families``)."""
    return tuple(m for m in METHODS if family == "vision" or m not in VISION_ONLY)


@dataclass
class MethodResult:
    model: nn.Module
    parameters: ParameterReport
    injection: InjectionReport | None = None


def as_method_config(method_cfg) -> MethodConfig:
    """The typed config of a ``method`` section (a DictConfig, a dict, or already typed)."""
    return load(MethodConfig, method_cfg, "method")


def lora_config_from(method_cfg, head: str | None, family: str):
    import peft

    lc = as_method_config(method_cfg).lora
    # a list matches module-name suffixes, a string is a regex matched against the full module name (peft)
    targets = lc.targets if isinstance(lc.targets, str) else list(lc.targets)
    kwargs = dict(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets, use_dora=lc.use_dora)
    if head:
        kwargs["modules_to_save"] = [head]
    if family == "causal_lm":
        kwargs["task_type"] = "CAUSAL_LM"
    return peft.LoraConfig(**kwargs)


def apply_method(
    model: nn.Module,
    method_cfg: MethodConfig,
    model_cfg: ModelConfig,
    calibration_batches: Iterable | None = None,
    forward: Callable | None = None,
) -> MethodResult:
    """Apply the method to a freshly built model (see the module docstring)."""
    method_cfg, model_cfg = as_method_config(method_cfg), as_model_config(model_cfg)
    name, family = method_cfg.name, model_cfg.family
    if family not in method_cfg.families:
        raise UserError(
            f"method={name} does not apply to {family} models; valid for {family}: " + ", ".join(methods_for(family))
        )
    head = (model_cfg.head or "head") if family == "vision" and method_cfg.train_head else None
    injection = None
    if method_cfg.full:
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        if method_cfg.lora:
            import peft

            _check_lora_targets(model, method_cfg)
            model = peft.get_peft_model(model, lora_config_from(method_cfg, head, family))
        if method_cfg.nora:
            injection = _inject_nora(model, method_cfg, None if method_cfg.lora else head, calibration_batches, forward)
        if method_cfg.baseline:
            model = apply_baseline(model, method_cfg.baseline, head, family)
        elif not method_cfg.lora and not method_cfg.nora:
            if head is None:
                raise UserError(f"method {name} trains nothing on a {family} model")
            model.get_submodule(head).requires_grad_(True)
    report = parameter_report(model)
    if report.trainable == 0:
        raise UserError(f"method {name} left no trainable parameter")
    return MethodResult(model, report, injection)


def _check_lora_targets(model: nn.Module, method_cfg: MethodConfig) -> None:
    """Each name in ``method.lora.targets`` matches a module (peft's rule); peft itself refuses a list only when none
    matches, as a traceback."""
    targets = method_cfg.lora.targets
    try:
        missing = lora_target_problems((n for n, _ in model.named_modules()), targets)
    except ValueError as exc:
        raise UserError(f"method.lora.targets={targets!r}: {exc}") from None
    if missing:
        raise UserError(
            f"method.lora.targets: {missing} match no module of {type(model).__name__} (a name matches a "
            "module's full name or its last segments; a string is a regex matched in full)"
        )


def _inject_nora(
    model: nn.Module, method_cfg: MethodConfig, head: str | None, calibration_batches, forward
) -> InjectionReport:
    settings = method_cfg.nora
    if settings.init == "calibrated" and calibration_batches is None:
        raise UserError(
            f"method {method_cfg.name} uses calibrated NoRA initialisation but no calibration batches were given"
        )
    cfg = settings.nora_config(head)
    for name in find_targets(model, cfg):
        width = activation_width(model, name)
        if width is not None and width % cfg.groups:
            raise UserError(nora_groups_message(cfg.groups, width, name))
    return apply_nora(model, cfg, calibration_batches=calibration_batches, forward=forward)
