"""The one autograd pattern every rational backend shares.

A backend supplies a no-grad ``forward(x, numerator, denominator, form) -> y`` and a
``backward(x, numerator, denominator, grad_out, form, need_coefficient_grads) -> (grad_x, grad_num, grad_den)``;
:func:`rational_autograd` wraps them in a ``torch.autograd.Function`` that saves only ``x`` and the coefficient
tensors (the backward recomputes P and Q), returns each gradient only where autograd asks for it, and hands the
coefficient gradients back in the coefficients' dtype.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

ForwardFn = Callable[[Tensor, Tensor, Tensor, str], Tensor]
BackwardFn = Callable[[Tensor, Tensor, Tensor, Tensor, str, bool], tuple[Tensor, "Tensor | None", "Tensor | None"]]


def rational_autograd(name: str, forward: ForwardFn, backward: BackwardFn) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` subclass called ``name``; use it as ``Cls.apply(x, num, den, form)``."""

    class RationalFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, numerator, denominator, form):
            ctx.save_for_backward(x, numerator, denominator)
            ctx.form = form
            return forward(x, numerator, denominator, form)

        @staticmethod
        def backward(ctx, grad_out):
            x, numerator, denominator = ctx.saved_tensors
            need_x, need_num, need_den = ctx.needs_input_grad[:3]
            gx, ga, gb = backward(x, numerator, denominator, grad_out, ctx.form, need_num or need_den)
            return (gx if need_x else None,
                    ga.to(numerator.dtype) if need_num else None,
                    gb.to(denominator.dtype) if need_den else None, None)

    RationalFunction.__name__ = RationalFunction.__qualname__ = name
    return RationalFunction
