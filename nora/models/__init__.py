"""Model builders by family: ``vision`` (timm) and ``causal_lm`` (Hugging Face)."""

from nora.errors import UserError
from nora.models.causal_lm import build_causal_lm
from nora.models.config import FAMILIES
from nora.models.vision import build_vision_model


def build_model(model_cfg, num_classes: int | None = None):
    """Build the model a ``configs/model/*.yaml`` describes: a vision model with a new ``num_classes`` head, or
    for ``causal_lm`` the pair ``(model, tokenizer)`` (:func:`nora.models.causal_lm.build_causal_lm`)."""
    family = model_cfg.family
    if family == "vision":
        return build_vision_model(model_cfg, num_classes)
    if family == "causal_lm":
        return build_causal_lm(model_cfg)
    raise UserError(f"unknown model family {family!r}; valid: {', '.join(FAMILIES)}")
