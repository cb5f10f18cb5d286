"""The ``model`` config group (``configs/model/*.yaml``) as typed schemas, one per family, and the family registry.

A model family (:class:`ModelFamily`) declares what the rest of the code asks of it: its schema, how its model is
built, whether it gets a new classifier head, peft's ``task_type``, whether it is a language model (tokenizer,
MMLU). Each family's builder module registers it (:func:`register_family` in :mod:`nora.models.vision` and
:mod:`nora.models.causal_lm`); :data:`FAMILIES` maps names to families once :mod:`nora.models` is imported.

The model builders take these schemas (:func:`as_model_config` also accepts a config.yaml section read back from a
run directory, so stored runs rebuild their base model through the same checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

from nora.adapter.config import INITS
from nora.schema import at_least, load, one_of


@dataclass(frozen=True)
class ModelFamily:
    """What the code branches on per model family (``model.family`` in configs/model/*.yaml)."""

    name: str
    schema: type  # the typed config of its configs/model/*.yaml
    build: Callable  # (model_cfg, num_classes) -> the model (language models: (model, tokenizer))
    classifier: bool  # a new classification head trains (method.train_head) and runs report accuracy
    language_model: bool  # a tokenizer next to the model; MMLU (eval.py) and lm-evaluation-harness apply
    peft_task_type: Optional[str] = None  # peft's task_type for LoRA and the peft baselines


FAMILIES: Dict[str, ModelFamily] = {}  # filled by register_family when nora.models is imported


def register_family(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.name] = family
    return family


def get_family(name: str, what: str = "model.family") -> ModelFamily:
    """The registered family ``name``; a one-line :class:`UserError` listing the valid ones otherwise."""
    one_of(what, name, tuple(FAMILIES))
    return FAMILIES[name]


DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
ARCHS = ("llama", "qwen2", "mistral")
ATTENTION = ("sdpa", "eager", "flash_attention_2")


@dataclass
class VisionModelConfig:
    """A timm vision transformer with a new classification head."""

    name: str = "vit_tiny"
    family: str = "vision"
    timm_name: str = "vit_tiny_patch16_224"
    pretrained_tag: Optional[str] = None
    pretrained: bool = True
    checkpoint: Optional[str] = None  # a local weights file instead of the hub cache
    checkpoint_head: bool = False  # keep the checkpoint's head (same classes): LP-FT from a linear probe
    kwargs: Dict[str, Any] = field(default_factory=dict)
    lora_targets: Any = None  # peft target_modules: a regex or a list of name suffixes
    nora_targets: List[str] = field(default_factory=list)
    head: Optional[str] = "head"
    nora_init: str = "fit"

    def __post_init__(self):
        one_of("nora_init", self.nora_init, INITS)

    def mlp_width(self) -> Optional[int]:
        """The width of the MLP activation if the config alone tells it (timm's ViT: embed_dim x mlp_ratio)."""
        dim = self.kwargs.get("embed_dim")
        return int(dim * self.kwargs.get("mlp_ratio", 4.0)) if dim else None


@dataclass
class CausalLMModelConfig:
    """A Hugging Face causal LM (LLaMA, Qwen2, Mistral), pretrained or random-initialised from ``config``."""

    name: str = "llama_tiny"
    family: str = "causal_lm"
    hf_name: Optional[str] = None
    gated: bool = False
    revision: Optional[str] = None
    path: Optional[str] = None  # a local directory with config.json, weights and tokenizer
    tokenizer: Optional[str] = None  # None: the model's own; offline: the bundled byte-level BPE
    tokenizer_kwargs: Optional[Dict[str, Any]] = None
    random_init: bool = False
    arch: str = "llama"  # random_init: llama | qwen2 | mistral
    init_seed: int = 0
    config: Dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    attn_implementation: Optional[str] = "sdpa"
    gradient_checkpointing: bool = False
    lora_targets: Any = None
    nora_targets: List[str] = field(default_factory=list)
    nora_init: str = "calibrated"
    head: Optional[str] = None

    def __post_init__(self):
        one_of("nora_init", self.nora_init, INITS)
        one_of("dtype", self.dtype, DTYPES)
        one_of("arch", self.arch, ARCHS)
        one_of("attn_implementation", self.attn_implementation or "sdpa", ATTENTION)
        at_least("init_seed", self.init_seed, 0)

    def mlp_width(self) -> Optional[int]:
        """The width of the SwiGLU activation when the config gives it (random-initialised models)."""
        width = self.config.get("intermediate_size")
        return int(width) if width else None


ModelConfig = Union[VisionModelConfig, CausalLMModelConfig]


def as_model_config(model_cfg) -> ModelConfig:
    """The typed config of a ``model`` section (a DictConfig, a dict, or already typed)."""
    if isinstance(model_cfg, tuple(f.schema for f in FAMILIES.values())):
        return model_cfg
    family = get_family(model_cfg.get("family") if hasattr(model_cfg, "get") else None)
    return load(family.schema, model_cfg, "model")
