"""timm vision transformers: pretrained (hub cache or a local file) or random-initialised."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nora.errors import UserError
from nora.models.config import ModelFamily, VisionModelConfig, as_model_config, register_family


def timm_model_id(model_cfg: VisionModelConfig) -> str:
    model_cfg = as_model_config(model_cfg)
    tag = model_cfg.pretrained_tag
    return f"{model_cfg.timm_name}.{tag}" if tag else model_cfg.timm_name


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def build_vision_model(model_cfg: VisionModelConfig, num_classes: int) -> nn.Module:
    """A timm model with a new ``num_classes`` head.

    * ``checkpoint``: a local weights file holding the backbone (its classifier head, if any, is
      dropped: the new task gets a freshly initialised head); missing, unexpected or mis-shaped
      backbone tensors are an error. With ``checkpoint_head: true`` the checkpoint's head is kept
      instead (it must exist and have ``num_classes`` outputs): fine-tuning that starts from a
      trained linear probe (LP-FT).
    * ``pretrained: true``: timm's pretrained weights for ``timm_name.pretrained_tag`` from the
      Hugging Face hub (or its local cache). Offline without a cached copy this ends in one message
      saying where to put the file.
    """
    import timm

    model_cfg = as_model_config(model_cfg)
    kwargs = dict(model_cfg.kwargs)
    ckpt = model_cfg.checkpoint
    model_id = timm_model_id(model_cfg)
    if ckpt:
        path = Path(ckpt)
        if not path.exists():
            raise UserError(f"model.checkpoint={ckpt} does not exist; point it at a .safetensors/.pth weights file")
        model = timm.create_model(model_cfg.timm_name, pretrained=False, num_classes=num_classes, **kwargs)
        state = _load_state(path)
        own = model.state_dict()
        head = model_cfg.head or "head"
        if model_cfg.checkpoint_head:  # LP-FT: the checkpoint's head was trained on this task
            theirs = {k: tuple(v.shape) for k, v in state.items() if k.startswith(head + ".")}
            ours = {k: tuple(v.shape) for k, v in own.items() if k.startswith(head + ".")}
            if theirs != ours:
                raise UserError(
                    f"model.checkpoint_head=true but {ckpt} has head tensors {theirs or 'none'}; this task needs {ours}"
                )
        else:  # the classifier of the checkpoint's own task is not reused: the new task gets a new head
            state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        bad = [k for k in skipped if not k.startswith(head + ".")]
        if bad:
            raise UserError(f"{ckpt}: tensor shapes do not match {model_cfg.name} for {bad[:4]}")
        state = {k: v for k, v in state.items() if k not in skipped}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(head + ".")]
        if missing or unexpected:
            raise UserError(f"{ckpt} does not fit {model_cfg.name}: missing {missing[:4]}, unexpected {unexpected[:4]}")
        return model
    if model_cfg.pretrained:
        try:
            return timm.create_model(model_id, pretrained=True, num_classes=num_classes, **kwargs)
        except Exception as exc:
            raise UserError(
                f"pretrained weights for {model_id} could not be loaded ({type(exc).__name__}; offline or not cached); "
                f"download them where there is network (`hf download timm/{model_id}`) and copy "
                f"~/.cache/huggingface/hub here, or set model.checkpoint=<path to model.safetensors>"
            ) from None
    return timm.create_model(model_cfg.timm_name, pretrained=False, num_classes=num_classes, **kwargs)


def input_size(model: nn.Module) -> int:
    """Square input resolution the model expects."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is not None:
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    return int(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])


def pretrained_cfg(model: nn.Module) -> dict:
    return dict(getattr(model, "pretrained_cfg", None) or {})


VISION = register_family(
    ModelFamily("vision", VisionModelConfig, build_vision_model, classifier=True, language_model=False)
)
