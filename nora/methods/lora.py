"""LoRA and DoRA through peft (``method.lora``: :class:`nora.methods.config.LoraSettings`); the new head trains too
(peft ``modules_to_save``)."""

from __future__ import annotations

from torch import nn

from nora.adapter.validate import lora_target_problems
from nora.errors import UserError
from nora.methods.config import MethodConfig
from nora.methods.registry import ApplyContext, Method, peft_common, register_method


def lora_config_from(ctx: ApplyContext):
    """peft's ``LoraConfig`` of the method's ``lora`` block."""
    import peft

    lc = ctx.method.lora
    # a list matches module-name suffixes, a string is a regex matched against the full module name (peft)
    targets = lc.targets if isinstance(lc.targets, str) else list(lc.targets)
    return peft.LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=targets,
        use_dora=lc.use_dora,
        **peft_common(ctx),
    )


def check_lora_targets(model: nn.Module, method_cfg: MethodConfig) -> None:
    """Each name in ``method.lora.targets`` matches a module (peft's rule); peft itself refuses a list only when none
    matches, as a traceback."""
    targets = method_cfg.lora.targets
    try:
        missing = lora_target_problems((n for n, _ in model.named_modules()), targets)
    except ValueError as exc:
        raise UserError(f"method.lora.targets={targets!r}: {exc}") from None
    if missing:
        raise UserError(
            f"method.lora.targets: {missing} match no module of {type(model).__name__} (a name matches a "
            "module's full name or its last segments; a string is a regex matched in full)"
        )


def add_lora(model: nn.Module, ctx: ApplyContext) -> nn.Module:
    """``model`` wrapped by peft with the method's LoRA (DoRA with ``use_dora``) adapter."""
    import peft

    check_lora_targets(model, ctx.method)
    return peft.get_peft_model(model, lora_config_from(ctx))


def apply_lora(model: nn.Module, ctx: ApplyContext):
    return add_lora(model, ctx), None


register_method(Method("lora", "LoRA", apply_lora, adapter="lora", settings=("lora",)))
register_method(Method("dora", "DoRA", apply_lora, adapter="dora", settings=("lora",)))
