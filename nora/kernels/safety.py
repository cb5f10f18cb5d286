"""A safety net for a kernel not yet validated on the hardware at hand (the Triton kernels).

On the first call of each *shape class* (device, channel width ``D``, groups ``G``, degrees, dtype, form:
everything but the leading row dimensions, which only change the launch grid) :meth:`SafetyNet.choose` runs
the kernel forward and backward on a small slice of the real input (at most :data:`SLICE_ROWS` rows; no
autograd graph, nothing saved) and compares it with the math of :mod:`nora.rational.functional` evaluated in
float64. A kernel that raises (a Triton compile error, a launch failure) or disagrees beyond the dtype's
tolerance is replaced for that shape class, after one warning giving the reason, by the next implementation:
``torch.compile`` of the reference math (checked the same way; its compile errors surface on first call), then
the pure-torch backend, which needs no compiler. Later calls of a checked class cost one dict lookup.

Under ``torch.compile`` the choice is made at trace time, eagerly and outside the graph: :func:`traced_verdict`
(a constant to dynamo) looks the shape class up and, for a class not seen yet, runs the same check on a synthetic
slice (seeded random inputs and coefficients of the class's shapes and dtype), since the real input is only a
fake tensor then. The compiled graph calls the chosen op directly.

The residual form ``phi(x) + (R(x) - R_fit(x))`` has a net of its own (``family=RESIDUAL``): its shape classes also
tell the activation apart, its reference is ``residual_forward`` / ``residual_backward``, and its fallbacks are
``torch.compile`` of ``residual_reference``, then the pure-torch ``residual_torch``.

The check runs wherever the kernel runs, so on the CPU under ``TRITON_INTERPRET=1`` as well: that is how the
tests exercise the fallback (they make the Triton path fail or disagree).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from nora.kernels import rational_torch, residual_torch
from nora.rational.functional import (
    activation_backward,
    activation_value,
    rational_backward,
    rational_forward,
    rational_reference,
    residual_backward,
    residual_forward,
    residual_reference,
)

SLICE_ROWS = 8
# max |got - ref| allowed, relative to |ref| + 1% of the largest |ref| of the quantity: far above rounding
# (float32 ~1e-7; a bfloat16/float16 output is rounded to 2^-8 / 2^-11, the interpreter truncates bfloat16 to
# 2^-7), far below what a wrong index, mask or formula produces (O(1)). For the residual form |ref| is replaced by
# the size of its parts, |phi| + |R| + |R_fit| (and of their derivatives for grad_x): the float32 difference of two
# close rationals is exact only to their size, not to the (possibly tiny) difference's.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}

# (x, numerator, denominator, [fit_numerator, fit_denominator,] form[, activation]) -> y, autograd-aware
ApplyFn = Callable[..., Tensor]
# (x, numerator, denominator, [fit_numerator, fit_denominator,] grad_out, form[, activation])
#   -> (y, grad_x, grad_numerator, grad_denominator), no graph kept
ProbeFn = Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class Candidate:
    name: str
    apply: ApplyFn  # the autograd-aware function used for real calls
    probe: ProbeFn  # forward + backward on a slice, for the self-check


def _split(args: tuple, n_tensors: int) -> tuple[tuple, tuple]:
    return tuple(args[:n_tensors]), tuple(args[n_tensors:])


def kernel_probe(forward, backward, n_tensors: int = 2) -> ProbeFn:
    """Probe of a backend given by its no-grad forward and backward (no autograd graph, nothing saved);
    ``n_tensors`` coefficient tensors follow ``x`` (2: the rational, 4: the residual form)."""

    def probe(x, *args):
        tensors, (go, *statics) = _split(args, n_tensors)
        gx, ga, gb = backward(x, *tensors, go, *statics, True)
        return forward(x, *tensors, *statics), gx, ga, gb

    return probe


def autograd_probe(apply: ApplyFn, n_tensors: int = 2) -> ProbeFn:
    """Probe of any autograd-aware function (detached copies, gradients of x and the first two coefficient
    tensors by torch.autograd.grad; a residual form's fit takes none)."""

    def probe(x, *args):
        tensors, (go, *statics) = _split(args, n_tensors)
        x, a, b = (t.detach().clone().requires_grad_() for t in (x, *tensors[:2]))
        rest = [t.detach() for t in tensors[2:]]
        with torch.enable_grad():
            y = apply(x, a, b, *rest, *statics)
            gx, ga, gb = torch.autograd.grad(y, (x, a, b), go)
        return y.detach(), gx, ga, gb

    return probe


_compiled_reference: ApplyFn | None = None
_compiled_residual_reference: ApplyFn | None = None


def compiled_reference(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "A") -> Tensor:
    """``torch.compile`` of the reference math (compiled on first use; inductor fuses forward and backward)."""
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(rational_reference, dynamic=True)
    return _compiled_reference(x, numerator, denominator, form)


def compiled_residual_reference(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    form: str = "A",
    activation: str = "none",
) -> Tensor:
    """``torch.compile`` of the residual form's reference math."""
    global _compiled_residual_reference
    if _compiled_residual_reference is None:
        _compiled_residual_reference = torch.compile(residual_reference, dynamic=True)
    return _compiled_residual_reference(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)


def torch_backend(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "A") -> Tensor:
    return rational_torch(x, numerator, denominator, form)


def residual_torch_backend(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    form: str = "A",
    activation: str = "none",
) -> Tensor:
    return residual_torch(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)


def fallbacks(family: "Family | None" = None) -> list[Candidate]:
    """What replaces a kernel that fails its self-check, in order; the last one is trusted without a check.
    (The module's functions are looked up at call time, so a test can replace them.)"""
    if family is None or family.name == "rational":
        return [
            Candidate("torch.compile", compiled_reference, autograd_probe(compiled_reference)),
            Candidate("torch", torch_backend, autograd_probe(torch_backend)),
        ]
    return [
        Candidate("torch.compile", compiled_residual_reference, autograd_probe(compiled_residual_reference, 4)),
        Candidate("torch", residual_torch_backend, autograd_probe(residual_torch_backend, 4)),
    ]


def _residual_scales(x: Tensor, tensors: tuple, go: Tensor, statics: tuple) -> tuple[Tensor, Tensor]:
    """Sizes of the residual form's parts, |phi| + |R| + |R_fit| and |go| (|phi'| + |R'| + |R_fit'|) (float64)."""
    a, b, fa, fb = tensors
    form, activation = statics
    ones = torch.ones_like(x)
    y = (
        activation_value(x, activation).abs()
        + rational_forward(x, a, b, form).abs()
        + rational_forward(x, fa, fb, form).abs()
    )
    d = (
        activation_backward(ones, x, activation).abs()
        + rational_backward(x, a, b, ones, form, False)[0].abs()
        + rational_backward(x, fa, fb, ones, form, False)[0].abs()
    )
    return y, go.abs() * d


@dataclass(frozen=True)
class Family:
    """What a safety net checks: the op's arguments and its float64 reference math."""

    name: str  # "rational" or "residual" (in the warnings)
    n_tensors: int  # coefficient tensors after x (the first two take gradients); then form[, activation]
    forward: Callable  # (x, *tensors, *statics) -> y, no graph
    backward: Callable  # (x, *tensors, go, *statics, needs_coefficient_grads) -> (gx, ga, gb)
    reference: ApplyFn  # plain autograd: what a compiled graph uses as its torch.compile fallback
    torch_fn: ApplyFn  # the pure-torch backend (last fallback)
    scales: Callable | None = None  # (x, tensors, go, statics) -> sizes of y and grad_x (None: |ref|)


RATIONAL = Family("rational", 2, rational_forward, rational_backward, rational_reference, torch_backend)
RESIDUAL = Family(
    "residual", 4, residual_forward, residual_backward, residual_reference, residual_torch_backend, _residual_scales
)


def shape_class(x: Tensor, numerator: Tensor, denominator: Tensor, form: str, *statics: str) -> tuple:
    """(device, D, G, m + 1, n, dtype, form[, activation])."""
    return (
        str(x.device),
        x.shape[-1],
        numerator.shape[0],
        numerator.shape[1],
        denominator.shape[1],
        x.dtype,
        form,
        *statics,
    )


def describe(key: tuple) -> str:
    device, d, g, m1, n, dtype, form, *rest = key
    act = f", activation {rest[0]}" if rest else ""
    return f"{device}, D={d}, G={g}, degrees ({m1 - 1},{n}), {str(dtype).replace('torch.', '')}, form {form}{act}"


def _mismatch(name: str, got: Tensor, ref: Tensor, tol: float, scale: Tensor | None = None) -> str | None:
    if got.shape != ref.shape:
        return f"{name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    got, finite = got.double(), torch.isfinite(ref)
    if not torch.equal(torch.isfinite(got), finite):
        return f"{name} is non-finite where the reference is not (or the reverse)"
    err = (got - ref).abs()[finite]
    scale = (ref.abs() if scale is None else scale.double().cpu())[finite]
    allowed = tol * (scale + 0.01 * (scale.max() if scale.numel() else 0.0))
    if (err > allowed).any():
        worst = int(torch.argmax(err - allowed))
        return (
            f"{name} differs from the reference by up to {err.max().item():.3g} "
            f"(got {got[finite][worst].item():.6g}, expected {ref[finite][worst].item():.6g})"
        )
    return None


def self_check(probe: ProbeFn, x: Tensor, *args, family: Family | None = None) -> str | None:
    """None if ``probe`` matches the float64 reference on a slice of ``x``, else why not (one line). ``args``: the
    coefficient tensors, then form (and the activation of the residual form, ``family=RESIDUAL``)."""
    family = family or RATIONAL
    tensors, statics = _split(args, family.n_tensors)
    rows = x.detach().reshape(-1, x.shape[-1])[:SLICE_ROWS]
    gen = torch.Generator().manual_seed(0)
    go = torch.randn(rows.shape, generator=gen).to(device=rows.device, dtype=rows.dtype)
    tensors = tuple(t.detach() for t in tensors)
    try:
        with torch.no_grad():
            got = probe(rows, *tensors, go, *statics)
        # block until the device has run it, so an asynchronous launch failure is caught here
        got = [t.detach().cpu() for t in got]
    except Exception as exc:  # noqa: BLE001  a compile error, a launch failure, an unsupported case: fall back
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")
    r64, g64 = rows.double(), go.double()
    t64 = tuple(t.double() for t in tensors)
    want = (family.forward(r64, *t64, *statics), *family.backward(r64, *t64, g64, *statics, True))
    scales = (*family.scales(r64, t64, g64, statics), None, None) if family.scales else (None,) * 4
    # rounded to the dtypes the kernel stores (x's for y and grad_x, float32 for the coefficient gradients), so a
    # value beyond float16's range is inf on both sides
    stored = (x.dtype, x.dtype, torch.float32, torch.float32)
    tol = TOLERANCE[x.dtype]
    for name, g, w, dtype, scale in zip(
        ("output", "grad_x", "grad_numerator", "grad_denominator"), got, want, stored, scales
    ):
        problem = _mismatch(name, g, w.to(dtype).double().cpu(), tol, scale)
        if problem:
            return problem
    return None


_NETS: dict[str, "SafetyNet"] = {}


def _synthetic_inputs(key: tuple, family: Family) -> tuple[Tensor, ...]:
    """A seeded slice of the shape class ``key`` (for a check at trace time, when the real input is fake):
    x, numerator, denominator (and a fit of the same shapes, drawn apart from them, for the residual form)."""
    device, d, g, m1, n, dtype, *_ = key
    gen = torch.Generator().manual_seed(0)
    x = (2.0 * torch.randn(SLICE_ROWS, d, generator=gen)).to(device=device, dtype=dtype)
    coefs = []
    for _ in range(family.n_tensors // 2):
        coefs += [
            (0.5 * torch.randn(g, m1, generator=gen)).to(device),
            (0.5 * torch.randn(g, n, generator=gen)).to(device),
        ]
    return (x, *coefs)


@torch.compiler.assume_constant_result
def traced_verdict(
    net: str, device: str, d: int, g: int, m1: int, n: int, dtype: torch.dtype, form: str, activation: str | None = None
) -> str:
    """Name of the candidate ``net`` uses for this shape class; dynamo runs it eagerly at trace time."""
    self = _NETS[net]
    key = (device, d, g, m1, n, dtype, form) + (() if activation is None else (activation,))
    if key not in self.verdicts:
        self.verdicts[key] = self._first_sound(key, *_synthetic_inputs(key, self.family), *key[6:])
    return self.verdicts[key].name


class SafetyNet:
    """Per shape class, the first of ``kernel``, then :func:`fallbacks`, that passes :func:`self_check`.

    ``family``: :data:`RATIONAL` (``apply(x, numerator, denominator, form)``, the default) or :data:`RESIDUAL`
    (``apply(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)``); ``forward`` and
    ``backward`` are the kernel's no-grad functions with the signatures of the family's reference ones."""

    def __init__(self, name: str, apply: ApplyFn, forward, backward, family: Family | None = None):
        self.family = family or RATIONAL
        self.kernel = Candidate(name, apply, kernel_probe(forward, backward, self.family.n_tensors))
        self.verdicts: dict[tuple, Candidate] = {}
        # the rational net is known by the kernel's name (as before); others by name/family
        self.net_id = name if self.family is RATIONAL else f"{name}/{self.family.name}"
        _NETS[self.net_id] = self

    def choose(self, x: Tensor, *args) -> ApplyFn:
        """The function to call with ``(x, *args)``: ``args`` as ``family`` defines them."""
        if x.numel() == 0:
            return self.kernel.apply
        tensors, statics = _split(args, self.family.n_tensors)
        key = shape_class(x, tensors[0], tensors[1], *statics)
        if torch.compiler.is_compiling():
            name = traced_verdict(self.net_id, *key)
            if name == self.kernel.name:
                return self.kernel.apply
            # inside a compiled graph the torch.compile fallback is the reference math itself (inductor compiles
            # it with the rest of the graph)
            return self.family.reference if name == "torch.compile" else self.family.torch_fn
        if key not in self.verdicts:
            self.verdicts[key] = self._first_sound(key, x, *args)
        return self.verdicts[key].apply

    def _first_sound(self, key: tuple, x: Tensor, *args) -> Candidate:
        chain = [self.kernel, *fallbacks(self.family)]
        for candidate, successor in zip(chain, chain[1:]):
            problem = self_check(candidate.probe, x, *args, family=self.family)
            if problem is None:
                return candidate
            warnings.warn(
                f"nora: the {candidate.name} {self.family.name} kernel failed its self-check on "
                f"{describe(key)} ({problem}); using {successor.name} for this shape class instead",
                RuntimeWarning,
                stacklevel=4,
            )
        return chain[-1]
