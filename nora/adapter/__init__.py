"""The NoRA adapter: configuration, layers, injection, save/load/merge, parameter accounting."""

from nora.adapter.accounting import ParameterReport, parameter_report
from nora.adapter.config import AdapterError, NoraConfig
from nora.adapter.discover import Layout, activation_layout, canonical_name, default_targets
from nora.adapter.inject import (
    InjectionReport,
    apply_nora,
    disable_adapter,
    find_activations,
    find_targets,
    freeze_batchnorm_statistics,
    get_nora_config,
    get_peft_model,
    mark_trainable,
    nora_modules,
    set_module,
    set_trainable,
)
from nora.adapter.io import load_nora, merge_nora, read_nora_config, read_peft_config, save_nora
from nora.adapter.layer import GroupRational, NoraActivation
from nora.adapter.merged import from_pretrained, save_merged

__all__ = [
    "AdapterError",
    "NoraConfig",
    "GroupRational",
    "NoraActivation",
    "InjectionReport",
    "ParameterReport",
    "apply_nora",
    "disable_adapter",
    "find_activations",
    "find_targets",
    "get_nora_config",
    "get_peft_model",
    "mark_trainable",
    "nora_modules",
    "set_module",
    "set_trainable",
    "parameter_report",
    "save_nora",
    "load_nora",
    "merge_nora",
    "read_nora_config",
    "read_peft_config",
    "save_merged",
    "from_pretrained",
    "Layout",
    "activation_layout",
    "canonical_name",
    "default_targets",
    "freeze_batchnorm_statistics",
]
