"""nora: parameter-efficient fine-tuning of activation functions (NoRA, NoRA++).

Quick start::

    import timm, nora
    model = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=100)
    report = nora.apply_nora(model, nora.NoraConfig(trainable_modules=["head"]))
    print(nora.parameter_report(model))   # NoRA + head parameters

This is the library layer alone (rational, kernels, adapter; torch, numpy and safetensors suffice). The
reproduction (``nora.app``: training runs, reload, MMLU, publishing; ``nora.results``, ``nora.demo``) is imported
where it is used: ``from nora.app.training import run_training``.
"""

from nora.adapter import (
    AdapterError,
    GroupRational,
    InjectionReport,
    NoraActivation,
    NoraConfig,
    ParameterReport,
    apply_nora,
    disable_adapter,
    find_activations,
    find_targets,
    from_pretrained,
    get_nora_config,
    get_peft_model,
    load_nora,
    mark_trainable,
    merge_nora,
    nora_modules,
    parameter_report,
    save_merged,
    save_nora,
    set_trainable,
)
from nora.kernels import available_backends, rational
from nora.rational.fit import RationalFit, fit_rational

try:  # NoRA as a peft method wherever peft is installed (a core install has no peft, and no peft method)
    # (it also lets nora.save_nora write NoRA++: the LoRA part of one NORA peft adapter)
    from nora.tuner import NoraPeftConfig, calibrate
except ImportError as _missing:  # peft (or what it needs) is not installed or cannot be imported here
    if not any(p in f"{_missing.name} {_missing}" for p in ("peft", "transformers", "accelerate")):
        raise

__version__ = "0.1.0"


__all__ = [
    "AdapterError",
    "GroupRational",
    "InjectionReport",
    "NoraActivation",
    "NoraConfig",
    "ParameterReport",
    "RationalFit",
    "apply_nora",
    "available_backends",
    "disable_adapter",
    "find_activations",
    "find_targets",
    "fit_rational",
    "from_pretrained",
    "get_nora_config",
    "get_peft_model",
    "load_nora",
    "mark_trainable",
    "merge_nora",
    "nora_modules",
    "parameter_report",
    "rational",
    "save_merged",
    "save_nora",
    "set_trainable",
]
if "NoraPeftConfig" in globals():
    __all__ += ["NoraPeftConfig", "calibrate"]
