"""Fine-tuning methods: which parameters train, and which adapters are added.

Every method is described by its config (``configs/method/*.yaml``) with the fields ``full``
(train every weight), ``lora`` (peft LoRA/DoRA settings or null), ``nora`` (NoRA settings or null)
and ``train_head``; :func:`apply_method` turns that into the model to train:

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

from nora.adapter import InjectionReport, NoraConfig, ParameterReport, apply_nora, parameter_report
from nora.errors import UserError

METHODS = ("full", "linear_probe", "lora", "dora", "nora", "nora_pp", "rational_ft", "zero_init_ft", "bitfit",
           "ln_tuning", "ia3", "vera")


@dataclass
class MethodResult:
    model: nn.Module
    parameters: ParameterReport
    injection: InjectionReport | None = None


def nora_config_from(method_cfg, head: str | None) -> NoraConfig:
    n = method_cfg.nora
    return NoraConfig(
        variant=n.variant, r=int(n.r), alpha=float(n.alpha), groups=int(n.groups), degrees=tuple(n.degrees),
        form=n.form, numerator=n.numerator, init=n.init, fit_range=tuple(n.fit_range),
        calibration_range_weight=float(n.get("calibration_range_weight", 0.1)),
        per_group_calibration=bool(n.get("per_group_calibration", False)),
        target_modules=list(n.targets) if n.get("targets") else None,
        trainable_modules=[head] if head else [], backend=n.get("backend", "auto"))


def lora_config_from(method_cfg, head: str | None, family: str):
    import peft

    lc = method_cfg.lora
    # a list matches module-name suffixes, a string is a regex matched against the full module name (peft)
    targets = lc.targets if isinstance(lc.targets, str) else list(lc.targets)
    kwargs = dict(r=int(lc.r), lora_alpha=float(lc.alpha), lora_dropout=float(lc.get("dropout", 0.0)),
                  target_modules=targets, use_dora=bool(lc.get("use_dora", False)))
    if head:
        kwargs["modules_to_save"] = [head]
    if family == "causal_lm":
        kwargs["task_type"] = "CAUSAL_LM"
    return peft.LoraConfig(**kwargs)


def apply_method(model: nn.Module, method_cfg, model_cfg, calibration_batches: Iterable | None = None,
                 forward: Callable | None = None) -> MethodResult:
    """Apply the method to a freshly built model (see the module docstring)."""
    name = method_cfg.name
    family = model_cfg.family
    if family not in method_cfg.families:
        raise UserError(f"method={name} does not apply to {family} models; valid for {family}: "
                        + ", ".join(m for m in METHODS if m != "linear_probe" or family == "vision"))
    head = (model_cfg.get("head") or "head") if family == "vision" and method_cfg.train_head else None
    injection = None
    if method_cfg.full:
        model.requires_grad_(True)
        if method_cfg.lora or method_cfg.nora:
            raise UserError(f"method {name}: full fine-tuning cannot be combined with lora/nora settings")
    else:
        model.requires_grad_(False)
        if method_cfg.lora:
            import peft
            model = peft.get_peft_model(model, lora_config_from(method_cfg, head, family))
        if method_cfg.nora:
            if method_cfg.nora.init == "calibrated" and calibration_batches is None:
                raise UserError(f"method {name} uses calibrated NoRA initialisation but no calibration batches "
                                "were given")
            cfg = nora_config_from(method_cfg, None if method_cfg.lora else head)
            injection = apply_nora(model, cfg, calibration_batches=calibration_batches, forward=forward)
        if method_cfg.get("baseline"):
            from nora.methods.baselines import apply_baseline
            model = apply_baseline(model, method_cfg.baseline, head, family)
        elif not method_cfg.lora and not method_cfg.nora:
            if head is None:
                raise UserError(f"method {name} trains nothing on a {family} model")
            model.get_submodule(head).requires_grad_(True)
    report = parameter_report(model)
    if report.trainable == 0:
        raise UserError(f"method {name} left no trainable parameter")
    return MethodResult(model, report, injection)
