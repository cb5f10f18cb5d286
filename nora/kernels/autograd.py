"""The one pattern every rational backend shares: a pair of ``torch.library`` custom ops with autograd.

A backend supplies a no-grad ``forward(x, numerator, denominator, form) -> y`` and a
``backward(x, numerator, denominator, grad_out, form, need_coefficient_grads) -> (grad_x, grad_num, grad_den)``;
:func:`rational_op` registers them as two custom ops, ``nora::<name>`` and ``nora::<name>_backward``, with fake
(meta) implementations that only propagate shapes and dtypes and an autograd formula that saves only ``x`` and
the coefficient tensors (the backward op recomputes P and Q). ``torch.compile`` therefore sees one opaque,
shape-propagating op per activation in the forward graph and one in the backward graph: no graph break, whatever
the kernel is (pure torch, a C++ extension, Triton). Everything that must not be traced (building an extension,
locks, caches, self-checks) runs inside the ops' implementations, which only ever run eagerly.

The backward op always returns three tensors (a custom op cannot return ``None``): when the coefficient gradients
are not needed it returns zeros of their (tiny) shape, and the autograd formula hands ``None`` to autograd.
Coefficient gradients come back in the coefficients' own dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from nora.rational.functional import rational_reference, residual_reference

ForwardFn = Callable[[Tensor, Tensor, Tensor, str], Tensor]
BackwardFn = Callable[[Tensor, Tensor, Tensor, Tensor, str, bool], tuple[Tensor, "Tensor | None", "Tensor | None"]]

NAMESPACE = "nora"
# each forward op registered here -> the plain-torch math it computes (nora.rational.functional's reference), for
# torch.export's run_decompositions (nora.kernels.reference_decompositions)
REFERENCE_MATH: dict = {}


def _coefficient_grad(g: Tensor | None, like: Tensor) -> Tensor:
    if g is None:
        return torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    return g.to(like.dtype).reshape(like.shape).contiguous()


def _op_pair(name: str, fwd_impl: Callable, bwd_impl: Callable, device_types: str | None, triton: bool):
    """Register ``nora::<name>`` (``fwd_impl``) and ``nora::<name>_backward`` (``bwd_impl``): ``triton_op``s, or
    ``custom_op``s with fake implementations that propagate shapes only (the forward returns a tensor like ``x``, the
    backward ``grad_x`` like ``x`` and the gradients of the two coefficient tensors after ``x``)."""
    if triton:
        return (
            torch.library.triton_op(f"{NAMESPACE}::{name}", fwd_impl, mutates_args=()),
            torch.library.triton_op(f"{NAMESPACE}::{name}_backward", bwd_impl, mutates_args=()),
        )
    fwd_op = torch.library.custom_op(f"{NAMESPACE}::{name}", fwd_impl, mutates_args=(), device_types=device_types)
    bwd_op = torch.library.custom_op(
        f"{NAMESPACE}::{name}_backward", bwd_impl, mutates_args=(), device_types=device_types
    )

    @fwd_op.register_fake
    def _(x, *_args):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @bwd_op.register_fake
    def _(x, numerator, denominator, *_args):
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty(numerator.shape, dtype=numerator.dtype, device=numerator.device),
            torch.empty(denominator.shape, dtype=denominator.dtype, device=denominator.device),
        )

    return fwd_op, bwd_op


def rational_op(
    name: str, forward: ForwardFn, backward: BackwardFn, device_types: str | None = None, triton: bool = False
):
    """Register ``nora::<name>`` (forward) and ``nora::<name>_backward`` and return the forward op.

    ``device_types`` restricts the implementations to one device type (``"cpu"`` for the C++ extension);
    ``None`` registers them for every device. ``triton=True`` defines both through ``torch.library.triton_op``
    (the implementations launch their kernels through ``torch.library.wrap_triton``, only torch ops around
    them): inductor then sees the kernels themselves, and the implementations run on fake tensors as their own
    fake implementations.
    """

    def fwd_impl(x: Tensor, numerator: Tensor, denominator: Tensor, form: str) -> Tensor:
        return forward(x, numerator, denominator, form)

    def bwd_impl(
        x: Tensor, numerator: Tensor, denominator: Tensor, grad_out: Tensor, form: str, need_coefficient_grads: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        gx, ga, gb = backward(x, numerator, denominator, grad_out, form, need_coefficient_grads)
        if not need_coefficient_grads:
            ga = gb = None
        return gx.reshape(x.shape), _coefficient_grad(ga, numerator), _coefficient_grad(gb, denominator)

    fwd_op, bwd_op = _op_pair(name, fwd_impl, bwd_impl, device_types, triton)

    def setup_context(ctx, inputs, output):
        x, numerator, denominator, form = inputs
        ctx.save_for_backward(x, numerator, denominator)
        ctx.form = form

    def backward_formula(ctx, grad_out):
        x, numerator, denominator = ctx.saved_tensors
        need_x, need_num, need_den = ctx.needs_input_grad[:3]
        gx, ga, gb = bwd_op(x, numerator, denominator, grad_out, ctx.form, bool(need_num or need_den))
        return (gx if need_x else None, ga if need_num else None, gb if need_den else None, None)

    fwd_op.register_autograd(backward_formula, setup_context=setup_context)
    fwd_op.backward_op = bwd_op
    REFERENCE_MATH[getattr(torch.ops, NAMESPACE).__getattr__(name).default] = rational_reference
    return fwd_op


ResidualForwardFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, str, str], Tensor]
ResidualBackwardFn = Callable[
    [Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, str, str, bool], tuple[Tensor, "Tensor | None", "Tensor | None"]
]


def residual_op(
    name: str,
    forward: ResidualForwardFn,
    backward: ResidualBackwardFn,
    device_types: str | None = None,
    triton: bool = False,
):
    """The residual form's pair of ops, ``nora::<name>(x, numerator, denominator, fit_numerator, fit_denominator,
    form, activation)`` and its ``_backward``, registered as :func:`rational_op` registers the plain rational's:
    fake implementations, an autograd formula that saves ``x`` and the four coefficient tensors. The fit's
    coefficients are frozen: asking for their gradient is an error (a silent zero would train nothing)."""

    def fwd_impl(
        x: Tensor,
        numerator: Tensor,
        denominator: Tensor,
        fit_numerator: Tensor,
        fit_denominator: Tensor,
        form: str,
        activation: str,
    ) -> Tensor:
        return forward(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)

    def bwd_impl(
        x: Tensor,
        numerator: Tensor,
        denominator: Tensor,
        fit_numerator: Tensor,
        fit_denominator: Tensor,
        grad_out: Tensor,
        form: str,
        activation: str,
        need_coefficient_grads: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        gx, ga, gb = backward(
            x,
            numerator,
            denominator,
            fit_numerator,
            fit_denominator,
            grad_out,
            form,
            activation,
            need_coefficient_grads,
        )
        if not need_coefficient_grads:
            ga = gb = None
        return gx.reshape(x.shape), _coefficient_grad(ga, numerator), _coefficient_grad(gb, denominator)

    fwd_op, bwd_op = _op_pair(name, fwd_impl, bwd_impl, device_types, triton)

    def setup_context(ctx, inputs, output):
        x, numerator, denominator, fit_numerator, fit_denominator, form, activation = inputs
        ctx.save_for_backward(x, numerator, denominator, fit_numerator, fit_denominator)
        ctx.form = form
        ctx.activation = activation

    def backward_formula(ctx, grad_out):
        x, numerator, denominator, fit_numerator, fit_denominator = ctx.saved_tensors
        need_x, need_num, need_den, need_fit_num, need_fit_den = ctx.needs_input_grad[:5]
        if need_fit_num or need_fit_den:
            raise RuntimeError(
                "the residual form's fit coefficients are frozen: they take no gradient (train the "
                "numerator/denominator, or detach the fit)"
            )
        gx, ga, gb = bwd_op(
            x,
            numerator,
            denominator,
            fit_numerator,
            fit_denominator,
            grad_out,
            ctx.form,
            ctx.activation,
            bool(need_num or need_den),
        )
        return (gx if need_x else None, ga if need_num else None, gb if need_den else None, None, None, None, None)

    fwd_op.register_autograd(backward_formula, setup_context=setup_context)
    fwd_op.backward_op = bwd_op
    REFERENCE_MATH[getattr(torch.ops, NAMESPACE).__getattr__(name).default] = residual_reference
    return fwd_op
