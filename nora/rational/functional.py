"""Group-wise rational functions F(x) = P(x) / Q(x): forward math and hand-derived gradients.

This module is the single source of truth for the formulas (see ``docs/method.md``); every kernel
backend (``nora.kernels``) implements exactly these and is tested against them.

Shapes and conventions
----------------------
* ``x`` has its channels on the last dimension ``D``, which is cut into ``G`` contiguous groups of
  ``D // G`` channels; group ``g`` uses row ``g`` of the coefficient tensors.
* ``numerator``: ``(G, m + 1)`` holding a_0 .. a_m; ``denominator``: ``(G, n)`` holding b_1 .. b_n
  (the constant of Q is fixed at 1).
* Math runs in float32 for float32/bfloat16/float16 inputs and in float64 for float64 inputs (the
  float64 path is the test oracle); the output has the input's dtype.
* Safe denominators, both >= 1 so F has no poles:

  - form ``"A"``: Q(x) = 1 + sum_j |b_j| |x|^j          (PAU / KAT kernels; the default)
  - form ``"B"``: Q(x) = 1 + |sum_j b_j x^j|            (PAU "version B", KAT paper text)

* Sub-gradients: ``sign(0) = 0`` everywhere (for |x| at x = 0, for |b_j| at b_j = 0 and for |R| at
  R = 0). This is what ``torch.abs`` differentiates to and the mean of the one-sided derivatives,
  i.e. what a central finite difference measures; the KAT CUDA kernel takes sign(0) = +1 for x,
  which differs only at exactly x = 0, by |b_1| P(0) / Q(0)^2.

Residual form (nora's default for NoRA layers, ``docs/method.md``): with ``phi`` the original activation and
``theta`` the frozen fit of it,

    y = phi(x) + (R_theta'(x) - R_theta(x))          (the difference first, then phi added)

so while the trained coefficients ``theta'`` equal ``theta`` (step 0, a disabled adapter) the difference is exactly
0 and ``y`` is ``phi(x)`` whatever the range of ``x``. ``dy/dx = phi'(x) + R'_theta'(x) - R'_theta(x)``; the
coefficient gradients are those of ``R_theta'`` alone (``theta`` is frozen). The kernels evaluate ``phi`` themselves
for the activations of :data:`KERNEL_ACTIVATIONS`; ``"none"`` is ``phi = 0`` (the caller adds any other activation).
"""

from __future__ import annotations

import torch
from torch import Tensor

FORMS = ("A", "B")
# the original activations a residual kernel evaluates itself; "none": phi = 0 (only the difference of rationals)
KERNEL_ACTIVATIONS = ("none", "gelu", "gelu_tanh", "silu", "relu")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (reference checks); every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(x: Tensor, numerator: Tensor, denominator: Tensor, form: str) -> int:
    """Validate dtypes and shapes and return the number of groups G."""
    for name, t in (("input", x), ("numerator", numerator), ("denominator", denominator)):
        if not t.is_floating_point():  # integer math would silently truncate P/Q
            raise TypeError(
                f"rational activations need floating-point tensors; the {name} is {t.dtype} "
                "(convert it with .float() first)"
            )
    if form not in FORMS:
        raise ValueError(f"unknown denominator form {form!r}; valid forms: {', '.join(FORMS)}")
    if numerator.dim() != 2 or denominator.dim() != 2:
        raise ValueError(
            f"coefficients must be 2-D (groups, degree): got numerator {tuple(numerator.shape)}, "
            f"denominator {tuple(denominator.shape)}"
        )
    groups = denominator.shape[0]
    if numerator.shape[0] != groups:
        raise ValueError(
            f"numerator has {numerator.shape[0]} groups but denominator has {groups}; expand a shared "
            "numerator to (G, m+1) before calling"
        )
    if x.dim() == 0:
        raise ValueError("input must have a channel dimension (the last one)")
    d = x.shape[-1]
    if d % groups != 0:
        raise ValueError(f"channel dimension {d} is not divisible by the number of groups {groups}")
    return groups


def _grouped(x: Tensor, groups: int) -> Tensor:
    """View (..., D) as (N, G, C) with C = D // G (copies only if x cannot be viewed)."""
    d = x.shape[-1]
    return x.reshape(-1, groups, d // groups)


def _poly(coeffs: Tensor, x: Tensor) -> Tensor:
    """Horner: sum_i coeffs[:, i] x^i with coeffs (G, k) broadcast over x (N, G, C)."""
    k = coeffs.shape[1]
    out = coeffs[:, k - 1].unsqueeze(-1).expand_as(x)
    for i in range(k - 2, -1, -1):
        out = out * x + coeffs[:, i].unsqueeze(-1)
    return out


def _denominator_tail(coeffs: Tensor, x: Tensor) -> Tensor:
    """sum_{j>=1} coeffs[:, j-1] x^j (Horner), coeffs (G, n)."""
    return _poly(coeffs, x) * x


def _rational_grouped(xg: Tensor, a: Tensor, b: Tensor, form: str) -> Tensor:
    """P/Q on grouped ``xg`` (N, G, C) with coefficients already in ``xg``'s dtype (differentiable)."""
    p = _poly(a, xg)
    if form == "A":
        q = 1.0 + _denominator_tail(b.abs(), xg.abs())
    else:
        q = 1.0 + _denominator_tail(b, xg).abs()
    return p / q


def rational_reference(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "A") -> Tensor:
    """Plain-autograd evaluation (no custom backward): the `reference` backend and the test oracle."""
    groups = check_inputs(x, numerator, denominator, form)
    cdt = compute_dtype(x.dtype)
    xg = _grouped(x, groups).to(cdt)
    return _rational_grouped(xg, numerator.to(cdt), denominator.to(cdt), form).to(x.dtype).reshape(x.shape)


def rational_forward(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "A") -> Tensor:
    """Forward value without building an autograd graph (used by custom autograd Functions)."""
    with torch.no_grad():
        return rational_reference(x, numerator, denominator, form)


def rational_backward(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    grad_out: Tensor,
    form: str = "A",
    needs_coefficient_grads: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Hand-derived gradients, recomputing P, Q from ``x``.

    Form A (S = sign(x)):
        dF/dx   = P'(x)/Q - S * (sum_j j |b_j| |x|^(j-1)) * P/Q^2
        dF/da_i = x^i / Q
        dF/db_j = -sign(b_j) |x|^j P / Q^2
    Form B (R = sum_j b_j x^j, Q = 1 + |R|):
        dF/dx   = P'(x)/Q - sign(R) R'(x) P/Q^2
        dF/da_i = x^i / Q
        dF/db_j = -sign(R) x^j P / Q^2

    Returns ``(grad_x in x.dtype, grad_numerator (G, m+1), grad_denominator (G, n))`` with the
    coefficient gradients summed over every element of their group, in the coefficients' dtype.
    """
    groups = check_inputs(x, numerator, denominator, form)
    cdt = compute_dtype(x.dtype)
    with torch.no_grad():
        xg = _grouped(x, groups).to(cdt)
        go = _grouped(grad_out, groups).to(cdt)
        grad_x, grad_a, grad_b = _rational_grads(
            xg, go, numerator.to(cdt), denominator.to(cdt), form, needs_coefficient_grads
        )
        if needs_coefficient_grads:
            grad_a = grad_a.to(numerator.dtype)
            grad_b = grad_b.to(denominator.dtype)
    return grad_x.to(x.dtype).reshape(x.shape), grad_a, grad_b


def _rational_grads(
    xg: Tensor, go: Tensor, a: Tensor, b: Tensor, form: str, needs_coefficient_grads: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """grad_x (grouped) and the coefficient gradients of P/Q, all in the compute dtype of ``xg``."""
    groups = xg.shape[1]
    cdt = xg.dtype
    m1, n = a.shape[1], b.shape[1]
    p = _poly(a, xg)
    # P'(x) = sum_{i>=1} i a_i x^(i-1)
    dp_coeffs = a[:, 1:] * torch.arange(1, m1, dtype=cdt, device=a.device)
    dp = _poly(dp_coeffs, xg) if m1 > 1 else torch.zeros_like(xg)
    jn = torch.arange(1, n + 1, dtype=cdt, device=b.device)
    if form == "A":
        ax = xg.abs()
        babs = b.abs()
        q = 1.0 + _denominator_tail(babs, ax)
        dq = torch.sign(xg) * _poly(babs * jn, ax)  # dQ/dx
        base = ax  # |x|^j multiplies dF/db_j
        den_sign = torch.sign(b).unsqueeze(-1)  # (G, n, 1)
    else:
        r = _denominator_tail(b, xg)
        q = 1.0 + r.abs()
        sr = torch.sign(r)
        dq = sr * _poly(b * jn, xg)
        base = xg
    inv_q = 1.0 / q
    f_over_q = p * inv_q * inv_q  # P / Q^2
    grad_x = go * (dp * inv_q - dq * f_over_q)
    grad_a = grad_b = None
    if needs_coefficient_grads:
        # sum over elements of each group of go * x^i / Q and of go * base^j * P/Q^2
        g_num = go * inv_q
        g_den = go * f_over_q
        if form == "B":
            g_den = g_den * sr
        grad_a = torch.empty((groups, m1), dtype=cdt, device=xg.device)
        grad_b = torch.empty((groups, n), dtype=cdt, device=xg.device)
        pw = torch.ones_like(xg)
        for i in range(m1):
            grad_a[:, i] = g_num.mul(pw).sum(dim=(0, 2))
            pw = pw * xg
        pw = base
        for j in range(n):
            grad_b[:, j] = -g_den.mul(pw).sum(dim=(0, 2))
            pw = pw * base
        if form == "A":
            grad_b = grad_b * den_sign.squeeze(-1)
    return grad_x, grad_a, grad_b


# --------------------------------------------------------------------------- residual form
def check_kernel_activation(activation: str) -> None:
    if activation not in KERNEL_ACTIVATIONS:
        raise ValueError(f"unknown kernel activation {activation!r}; valid: {', '.join(KERNEL_ACTIVATIONS)}")


def check_residual_inputs(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    form: str,
    activation: str,
) -> int:
    """:func:`check_inputs` plus: the fit's coefficients have the shapes of the trained ones, a known activation."""
    groups = check_inputs(x, numerator, denominator, form)
    if fit_numerator.shape != numerator.shape or fit_denominator.shape != denominator.shape:
        raise ValueError(
            f"the fit's coefficients {tuple(fit_numerator.shape)}, {tuple(fit_denominator.shape)} must "
            f"have the shapes of the trained ones {tuple(numerator.shape)}, {tuple(denominator.shape)}"
        )
    if not (fit_numerator.is_floating_point() and fit_denominator.is_floating_point()):
        raise TypeError("rational activations need floating-point coefficients")
    check_kernel_activation(activation)
    return groups


def activation_value(x: Tensor, activation: str) -> Tensor:
    """phi(x) of a kernel activation, in ``x``'s dtype (torch's own definitions; ``none`` is 0)."""
    if activation == "gelu":
        return torch.nn.functional.gelu(x)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if activation == "silu":
        return torch.nn.functional.silu(x)
    if activation == "relu":
        return torch.relu(x)
    check_kernel_activation(activation)
    return torch.zeros_like(x)


def activation_backward(grad_out: Tensor, x: Tensor, activation: str) -> Tensor:
    """grad_out * phi'(x) for a kernel activation (torch's own backward formulas; relu'(0) = 0 as torch)."""
    if activation in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(grad_out, x, approximate="tanh" if activation == "gelu_tanh" else "none")
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad_out, x)
    if activation == "relu":
        return torch.where(x > 0, grad_out, torch.zeros_like(grad_out))
    check_kernel_activation(activation)
    return torch.zeros_like(grad_out)


def residual_reference(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    form: str = "A",
    activation: str = "none",
) -> Tensor:
    """``phi(x) + (R_num,den(x) - R_fit(x))``, plain autograd (the `reference` backend and the test oracle)."""
    groups = check_residual_inputs(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)
    cdt = compute_dtype(x.dtype)
    xg = _grouped(x, groups).to(cdt)
    diff = _rational_grouped(xg, numerator.to(cdt), denominator.to(cdt), form) - _rational_grouped(
        xg, fit_numerator.to(cdt), fit_denominator.to(cdt), form
    )
    return (activation_value(xg, activation) + diff).to(x.dtype).reshape(x.shape)


def residual_forward(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    form: str = "A",
    activation: str = "none",
) -> Tensor:
    """Forward value of the residual form without an autograd graph."""
    with torch.no_grad():
        return residual_reference(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)


def residual_backward(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    grad_out: Tensor,
    form: str = "A",
    activation: str = "none",
    needs_coefficient_grads: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``grad_x = grad_out * (phi'(x) + (R'_num,den(x) - R'_fit(x)))`` and the coefficient gradients of
    ``R_num,den`` (the fit is frozen), as :func:`rational_backward` returns them."""
    groups = check_residual_inputs(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)
    cdt = compute_dtype(x.dtype)
    with torch.no_grad():
        xg = _grouped(x, groups).to(cdt)
        go = _grouped(grad_out, groups).to(cdt)
        gx, grad_a, grad_b = _rational_grads(
            xg, go, numerator.to(cdt), denominator.to(cdt), form, needs_coefficient_grads
        )
        gx_fit, _, _ = _rational_grads(xg, go, fit_numerator.to(cdt), fit_denominator.to(cdt), form, False)
        grad_x = activation_backward(go, xg, activation) + (gx - gx_fit)
        if needs_coefficient_grads:
            grad_a = grad_a.to(numerator.dtype)
            grad_b = grad_b.to(denominator.dtype)
    return grad_x.to(x.dtype).reshape(x.shape), grad_a, grad_b
