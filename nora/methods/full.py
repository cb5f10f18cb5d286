"""Full fine-tuning (every weight trains) and the linear probe (only the new classifier head trains)."""

from __future__ import annotations

from torch import nn

from nora.errors import UserError
from nora.methods.registry import ApplyContext, Method, register_method


def train_everything(model: nn.Module, ctx: ApplyContext):
    model.requires_grad_(True)
    return model, None


def train_head(model: nn.Module, ctx: ApplyContext):
    if ctx.head is None:
        raise UserError(f"method {ctx.method.name} trains nothing on a {ctx.family.name} model")
    model.get_submodule(ctx.head).requires_grad_(True)
    return model, None


register_method(Method("full", "full FT", train_everything, head_lr=False))
register_method(Method("linear_probe", "linear probe", train_head, families=("vision",), head_lr=False))
