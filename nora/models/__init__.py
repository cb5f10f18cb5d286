"""Model builders by family: ``vision`` (timm, :mod:`nora.models.vision`) and ``causal_lm`` (Hugging Face,
:mod:`nora.models.causal_lm`); each module registers its :class:`nora.models.config.ModelFamily`."""

# isort: off
from nora.models import vision, causal_lm  # noqa: F401  each registers its family, in this order

# isort: on
from nora.models.config import get_family


def build_model(model_cfg, num_classes: int | None = None):
    """Build the model a ``configs/model/*.yaml`` describes: a vision model with a new ``num_classes`` head, or
    for ``causal_lm`` the pair ``(model, tokenizer)`` (:func:`nora.models.causal_lm.build_causal_lm`)."""
    return get_family(model_cfg.family).build(model_cfg, num_classes)
