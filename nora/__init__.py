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
    load_nora_pp,
    mark_trainable,
    merge_nora,
    nora_modules,
    parameter_report,
    read_nora_config,
    read_peft_config,
    save_merged,
    save_nora,
    save_nora_pp,
    set_trainable,
)
from nora.kernels import available_backends, rational
from nora.rational.fit import RationalFit, fit_rational

try:  # NoRA as a peft method wherever peft is installed (a core install has no peft, and no peft method)
    from nora.tuner import NoraPeftConfig, calibrate

    # NoRA++ saved as one peft adapter (peft's own loaders read it); the loader reads the earlier two-part format too
    from nora.tuner import load_pretrained as load_nora_pp
    from nora.tuner import save_pretrained as save_nora_pp
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
    "load_nora_pp",
    "mark_trainable",
    "merge_nora",
    "nora_modules",
    "parameter_report",
    "rational",
    "read_nora_config",
    "read_peft_config",
    "save_merged",
    "save_nora",
    "save_nora_pp",
    "set_trainable",
]
if "NoraPeftConfig" in globals():
    __all__ += ["NoraPeftConfig", "calibrate"]
