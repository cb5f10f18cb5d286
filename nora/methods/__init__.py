"""Fine-tuning methods: which parameters train, and which adapters are added.

Each method is one registered :class:`nora.methods.registry.Method` declared in a module of this package (every
module in it is imported here, so a new ``nora/methods/<name>.py`` registers itself) and one
``configs/method/<name>.yaml`` (typed by :class:`nora.methods.config.MethodConfig`: ``lora``, ``nora`` and
``baseline`` blocks, ``train_head``, learning rates); :func:`apply_method` turns them into the model to train:

=============  ====================================================================
full           every weight (and the new head)                          full.py
linear_probe   only the new head                                        full.py
lora / dora    peft LoRA / DoRA on ``lora.targets`` (+ the head via ``modules_to_save``)    lora.py
nora           NoRA activations (+ the head)                            nora.py
nora_pp        peft LoRA + NoRA, trained jointly (+ the head)           nora.py
rational_ft    NoRA activations with variant ``rational_ft`` (ablation) nora.py
zero_init_ft   NoRA activations with variant ``zero_init_ft`` (ablation) nora.py
bitfit, ...    low-budget baselines under ``baseline:`` (bitfit, ln_tuning, ia3, vera)  baselines.py
=============  ====================================================================
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Iterable

from torch import nn

from nora.adapter import InjectionReport, ParameterReport, parameter_report
from nora.errors import UserError

# each module registers its methods: the paper's first, in the result tables' order, then any other module here
# isort: off
from nora.methods import full, lora, nora, baselines  # noqa: F401

# isort: on
from nora.methods.config import MethodConfig
from nora.methods.registry import METHODS, ApplyContext, Method, get_method, method_for, methods_for
from nora.models.config import ModelConfig, as_model_config, get_family
from nora.schema import load

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # a new method's module registers itself

__all__ = [
    "METHODS",
    "Method",
    "MethodResult",
    "apply_method",
    "as_method_config",
    "get_method",
    "method_for",
    "methods_for",
]


@dataclass
class MethodResult:
    model: nn.Module
    parameters: ParameterReport
    injection: InjectionReport | None = None


def as_method_config(method_cfg) -> MethodConfig:
    """The typed config of a ``method`` section (a DictConfig, a dict, or already typed)."""
    return load(MethodConfig, method_cfg, "method")


def apply_method(
    model: nn.Module,
    method_cfg: MethodConfig,
    model_cfg: ModelConfig,
    calibration_batches: Iterable | None = None,
    forward: Callable | None = None,
) -> MethodResult:
    """Apply the registered method of ``method_cfg.name`` to a freshly built model, frozen first (see the module
    docstring); the parameter report names the method's own components."""
    method_cfg, model_cfg = as_method_config(method_cfg), as_model_config(model_cfg)
    method, family = method_for(method_cfg, model_cfg.family), get_family(model_cfg.family)
    head = (model_cfg.head or "head") if family.classifier and method_cfg.train_head else None
    model.requires_grad_(False)
    model, injection = method.apply(model, ApplyContext(method_cfg, family, head, calibration_batches, forward))
    report = parameter_report(model, method.components)
    if report.trainable == 0:
        raise UserError(f"method {method.name} left no trainable parameter")
    return MethodResult(model, report, injection)
