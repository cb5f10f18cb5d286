"""The ``model`` config group (``configs/model/*.yaml``) as typed schemas, one per family.

The model builders take these (:func:`as_model_config` also accepts a config.yaml section read back from a run
directory, so stored runs rebuild their base model through the same checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from nora.adapter.config import INITS
from nora.schema import at_least, load, one_of

FAMILIES = ("vision", "causal_lm")
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
SCHEMAS = {"vision": VisionModelConfig, "causal_lm": CausalLMModelConfig}


def as_model_config(model_cfg) -> ModelConfig:
    """The typed config of a ``model`` section (a DictConfig, a dict, or already typed)."""
    if isinstance(model_cfg, (VisionModelConfig, CausalLMModelConfig)):
        return model_cfg
    family = model_cfg.get("family") if hasattr(model_cfg, "get") else None
    one_of("model.family", family, FAMILIES)
    return load(SCHEMAS[family], model_cfg, "model")
