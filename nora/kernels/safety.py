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

The check runs wherever the kernel runs, so on the CPU under ``TRITON_INTERPRET=1`` as well: that is how the
tests exercise the fallback (they make the Triton path fail or disagree).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from nora.kernels import rational_torch
from nora.rational.functional import rational_backward, rational_forward, rational_reference

SLICE_ROWS = 8
# max |got - ref| allowed, relative to |ref| + 1% of the largest |ref| of the quantity: far above rounding
# (float32 ~1e-7; a bfloat16/float16 output is rounded to 2^-8 / 2^-11, the interpreter truncates bfloat16 to
# 2^-7), far below what a wrong index, mask or formula produces (O(1))
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}

ApplyFn = Callable[[Tensor, Tensor, Tensor, str], Tensor]
# (x, numerator, denominator, grad_out, form) -> (y, grad_x, grad_numerator, grad_denominator), no graph kept
ProbeFn = Callable[[Tensor, Tensor, Tensor, Tensor, str], tuple[Tensor, Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class Candidate:
    name: str
    apply: ApplyFn  # the autograd-aware function used for real calls
    probe: ProbeFn  # forward + backward on a slice, for the self-check


def kernel_probe(forward, backward) -> ProbeFn:
    """Probe of a backend given by its no-grad forward and backward (no autograd graph, nothing saved)."""
    def probe(x, a, b, go, form):
        gx, ga, gb = backward(x, a, b, go, form, True)
        return forward(x, a, b, form), gx, ga, gb

    return probe


def autograd_probe(apply: ApplyFn) -> ProbeFn:
    """Probe of any autograd-aware rational function (detached copies, gradients by torch.autograd.grad)."""
    def probe(x, a, b, go, form):
        x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
        with torch.enable_grad():
            y = apply(x, a, b, form)
            gx, ga, gb = torch.autograd.grad(y, (x, a, b), go)
        return y.detach(), gx, ga, gb

    return probe


_compiled_reference: ApplyFn | None = None


def compiled_reference(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "A") -> Tensor:
    """``torch.compile`` of the reference math (compiled on first use; inductor fuses forward and backward)."""
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(rational_reference, dynamic=True)
    return _compiled_reference(x, numerator, denominator, form)


def torch_backend(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "A") -> Tensor:
    return rational_torch(x, numerator, denominator, form)


def fallbacks() -> list[Candidate]:
    """What replaces a kernel that fails its self-check, in order; the last one is trusted without a check."""
    return [Candidate("torch.compile", compiled_reference, autograd_probe(compiled_reference)),
            Candidate("torch", torch_backend, autograd_probe(torch_backend))]


def shape_class(x: Tensor, numerator: Tensor, denominator: Tensor, form: str) -> tuple:
    return (str(x.device), x.shape[-1], numerator.shape[0], numerator.shape[1], denominator.shape[1], x.dtype, form)


def describe(key: tuple) -> str:
    device, d, g, m1, n, dtype, form = key
    return f"{device}, D={d}, G={g}, degrees ({m1 - 1},{n}), {str(dtype).replace('torch.', '')}, form {form}"


def _mismatch(name: str, got: Tensor, ref: Tensor, tol: float) -> str | None:
    if got.shape != ref.shape:
        return f"{name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    got, finite = got.double(), torch.isfinite(ref)
    if not torch.equal(torch.isfinite(got), finite):
        return f"{name} is non-finite where the reference is not (or the reverse)"
    err = (got - ref).abs()[finite]
    scale = ref.abs()[finite]
    allowed = tol * (scale + 0.01 * (scale.max() if scale.numel() else 0.0))
    if (err > allowed).any():
        worst = int(torch.argmax(err - allowed))
        return (f"{name} differs from the reference by up to {err.max().item():.3g} "
                f"(got {got[finite][worst].item():.6g}, expected {ref[finite][worst].item():.6g})")
    return None


def self_check(probe: ProbeFn, x: Tensor, a: Tensor, b: Tensor, form: str) -> str | None:
    """None if ``probe`` matches the float64 reference on a slice of ``x``, else why not (one line)."""
    rows = x.detach().reshape(-1, x.shape[-1])[:SLICE_ROWS]
    gen = torch.Generator().manual_seed(0)
    go = torch.randn(rows.shape, generator=gen).to(device=rows.device, dtype=rows.dtype)
    a, b = a.detach(), b.detach()
    try:
        with torch.no_grad():
            got = probe(rows, a, b, go, form)
        # block until the device has run it, so an asynchronous launch failure is caught here
        got = [t.detach().cpu() for t in got]
    except Exception as exc:  # noqa: BLE001  a compile error, a launch failure, an unsupported case: fall back
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")
    r64, a64, b64, g64 = (t.double() for t in (rows, a, b, go))
    want = (rational_forward(r64, a64, b64, form), *rational_backward(r64, a64, b64, g64, form))
    # rounded to the dtypes the kernel stores (x's for y and grad_x, float32 for the coefficient gradients), so a
    # value beyond float16's range is inf on both sides
    stored = (x.dtype, x.dtype, torch.float32, torch.float32)
    tol = TOLERANCE[x.dtype]
    for name, g, w, dtype in zip(("output", "grad_x", "grad_numerator", "grad_denominator"), got, want, stored):
        problem = _mismatch(name, g, w.to(dtype).double().cpu(), tol)
        if problem:
            return problem
    return None


_NETS: dict[str, "SafetyNet"] = {}


def _synthetic_inputs(key: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """A seeded slice of the shape class ``key`` (for a check at trace time, when the real input is fake)."""
    device, d, g, m1, n, dtype, _ = key
    gen = torch.Generator().manual_seed(0)
    x = (2.0 * torch.randn(SLICE_ROWS, d, generator=gen)).to(device=device, dtype=dtype)
    a = (0.5 * torch.randn(g, m1, generator=gen)).to(device)
    b = (0.5 * torch.randn(g, n, generator=gen)).to(device)
    return x, a, b


@torch.compiler.assume_constant_result
def traced_verdict(net: str, device: str, d: int, g: int, m1: int, n: int, dtype: torch.dtype, form: str) -> str:
    """Name of the candidate ``net`` uses for this shape class; dynamo runs it eagerly at trace time."""
    self = _NETS[net]
    key = (device, d, g, m1, n, dtype, form)
    if key not in self.verdicts:
        self.verdicts[key] = self._first_sound(key, *_synthetic_inputs(key), form)
    return self.verdicts[key].name


class SafetyNet:
    """Per shape class, the first of ``kernel``, then :func:`fallbacks`, that passes :func:`self_check`."""

    def __init__(self, name: str, apply: ApplyFn, forward, backward):
        self.kernel = Candidate(name, apply, kernel_probe(forward, backward))
        self.verdicts: dict[tuple, Candidate] = {}
        _NETS[name] = self

    def choose(self, x: Tensor, numerator: Tensor, denominator: Tensor, form: str) -> ApplyFn:
        if x.numel() == 0:
            return self.kernel.apply
        key = shape_class(x, numerator, denominator, form)
        if torch.compiler.is_compiling():
            name = traced_verdict(self.kernel.name, *key)
            if name == self.kernel.name:
                return self.kernel.apply
            # inside a compiled graph the torch.compile fallback is the reference math itself (inductor compiles
            # it with the rest of the graph)
            return rational_reference if name == "torch.compile" else torch_backend
        if key not in self.verdicts:
            self.verdicts[key] = self._first_sound(key, x, numerator, denominator, form)
        return self.verdicts[key].apply

    def _first_sound(self, key: tuple, x: Tensor, a: Tensor, b: Tensor, form: str) -> Candidate:
        chain = [self.kernel, *fallbacks()]
        for candidate, successor in zip(chain, chain[1:]):
            problem = self_check(candidate.probe, x, a, b, form)
            if problem is None:
                return candidate
            warnings.warn(f"nora: the {candidate.name} rational kernel failed its self-check on {describe(key)} "
                          f"({problem}); using {successor.name} for this shape class instead", RuntimeWarning,
                          stacklevel=4)
        return chain[-1]
