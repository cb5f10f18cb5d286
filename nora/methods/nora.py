"""NoRA (``method.nora``: :class:`nora.methods.config.NoraSettings`), its ablations (the same injection with another
``nora.variant``: rational_ft, zero_init_ft) and NoRA++ (peft LoRA and NoRA, trained jointly)."""

from __future__ import annotations

from torch import nn

from nora.adapter import InjectionReport, apply_nora
from nora.adapter.engine import GroupsError
from nora.errors import UserError
from nora.methods.config import MethodConfig
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
    try:
        return apply_nora(model, settings.nora_config(head), calibration_batches=calibration_batches, forward=forward)
    except GroupsError as exc:  # the engine's one check, named by its config key
        raise UserError(f"method.nora.{exc}") from None


def apply_nora_method(model: nn.Module, ctx: ApplyContext):
    return model, _inject_nora(model, ctx.method, ctx.head, ctx.calibration_batches, ctx.forward)


def apply_nora_pp(model: nn.Module, ctx: ApplyContext):
    model = add_lora(model, ctx)  # the head is LoRA's modules_to_save
    return model, _inject_nora(model, ctx.method, None, ctx.calibration_batches, ctx.forward)


NORA = dict(adapter="nora", settings=("nora",))
register_method(Method("nora", "NoRA", apply_nora_method, **NORA))
register_method(Method("nora_pp", "NoRA++", apply_nora_pp, adapter="nora++", settings=("lora", "nora"), lr_from="lora"))
register_method(Method("rational_ft", "rational FT", apply_nora_method, **NORA))
register_method(Method("zero_init_ft", "zero-init FT", apply_nora_method, **NORA))
