"""NoRA (``method.nora``: :class:`nora.methods.config.NoraSettings`), its ablations (the same injection with another
``nora.variant``: rational_ft, zero_init_ft) and NoRA++ (peft LoRA and NoRA, trained jointly)."""

from __future__ import annotations

from torch import nn

from nora.adapter import InjectionReport, apply_nora
from nora.adapter.inject import activation_width, find_targets
from nora.errors import UserError
from nora.methods.config import MethodConfig, nora_groups_message
from nora.methods.lora import add_lora
from nora.methods.registry import ApplyContext, Method, register_method


def _inject_nora(
    model: nn.Module, method_cfg: MethodConfig, head: str | None, calibration_batches, forward
) -> InjectionReport:
    settings = method_cfg.nora
    if settings.init == "calibrated" and calibration_batches is None:
        raise UserError(
            f"method {method_cfg.name} uses calibrated NoRA initialisation but no calibration batches were given"
        )
    cfg = settings.nora_config(head)
    for name in find_targets(model, cfg):
        width = activation_width(model, name)
        if width is not None and width % cfg.groups:
            raise UserError(nora_groups_message(cfg.groups, width, name))
    return apply_nora(model, cfg, calibration_batches=calibration_batches, forward=forward)


def apply_nora_method(model: nn.Module, ctx: ApplyContext):
    return model, _inject_nora(model, ctx.method, ctx.head, ctx.calibration_batches, ctx.forward)


def apply_nora_pp(model: nn.Module, ctx: ApplyContext):
    model = add_lora(model, ctx)  # the head is LoRA's modules_to_save
    return model, _inject_nora(model, ctx.method, None, ctx.calibration_batches, ctx.forward)


NORA = dict(adapter="nora", settings=("nora",))
register_method(Method("nora", "NoRA", apply_nora_method, **NORA))
register_method(Method("nora_pp", "NoRA++", apply_nora_pp, adapter="nora++", settings=("lora", "nora")))
register_method(Method("rational_ft", "rational FT", apply_nora_method, **NORA))
register_method(Method("zero_init_ft", "zero-init FT", apply_nora_method, **NORA))
