"""The Triton kernels' residual form ``phi(x) + (R(x) - R_fit(x))`` on the CPU through the interpreter
(TRITON_INTERPRET=1), small shapes; and the compiled kernels built for a CUDA target (no GPU needed).

As in ``test_kernels_triton.py``, ``test_triton_residual_interpreter_suite`` re-runs this file in a subprocess with
the variable set (Triton must see it before it is first imported); the interpreter tests run only there.

Oracle: ``residual_reference`` on float64 copies of the (rounded) inputs, differentiated by plain autograd. Bounds
(those of ``test_kernels.py``, for a sum of three parts): outputs and grad_x within
``ROUND * (|ref| + RTOL * scale) + RTOL * scale`` where ``scale`` adds the condition scales of both rationals (the
float32 difference of two close rationals is exact only to their size) and the size of phi's terms (|x| for phi,
|go| times the sum of phi''s terms' magnitudes for grad_x); in form B the elements at a kink of either rational are
left out of grad_x. Coefficient gradients (those of ``R`` alone, the fit frozen) within
``COEF_RTOL * S + kink``, ``S`` the abs-term sums of ``R``'s gradient. The equal-coefficient checks are exact.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from test_kernels import COEF_RTOL, FLOOR, ROUND, RTOL, bounds, make_coefficients  # noqa: E402

import nora.kernels.triton as tk  # noqa: E402
from nora.rational.functional import KERNEL_ACTIVATIONS, activation_backward, activation_value, residual_reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.bfloat16)
# Triton's interpreter truncates float32 -> bfloat16 (a whole ulp, not half)
INTERP_ROUND = {torch.float32: ROUND[torch.float32], torch.bfloat16: 2.0**-7}
interpreted = pytest.mark.skipif(
    not INTERPRET, reason="runs in the TRITON_INTERPRET=1 subprocess started by test_triton_residual_interpreter_suite"
)
_ids = {"ids": lambda d: str(d).split(".")[-1]}


@pytest.mark.skipif(INTERPRET, reason="already in interpreter mode")
@pytest.mark.slow  # 22 s here: end to end (make test-slow, CI)
def test_triton_residual_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider", "-m", "not slow"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    print(out.stdout[-4000:])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and " failed" not in out.stdout


# --------------------------------------------------------------------------- oracle and bounds
def _phi_scales(x: torch.Tensor, go: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sizes of phi's float32 evaluation: |x| bounds |phi(x)| and its terms; for phi' the sum of its terms'
    magnitudes (cdf + |x| pdf, ...), times |go|."""
    x, go = x.double(), go.double().abs()
    if activation == "none":
        return torch.zeros_like(x), torch.zeros_like(x)
    if activation == "gelu":
        d = 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x.abs() * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    elif activation == "gelu_tanh":
        k = math.sqrt(2 / math.pi)
        t = torch.tanh(k * (x + 0.044715 * x**3))
        d = 0.5 * (1 + t) + 0.5 * x.abs() * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)
    elif activation == "silu":
        s = torch.sigmoid(x)
        d = s * (1 + x.abs() * (1 - s))
    else:  # relu
        d = torch.ones_like(x)
    return x.abs(), go * d


def check_residual(fn, x, a, b, fa, fb, go, form, activation, label, round_rel=None) -> dict:
    """Run ``fn`` forward and backward (gradients of x, numerator, denominator), assert the bounds of the module
    docstring and return the worst absolute errors and error/bound ratios per quantity."""
    xx, aa, bb = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y = fn(xx, aa, bb, fa, fb, form, activation)
    assert y.dtype == x.dtype and y.shape == x.shape, label
    y.backward(go)
    assert xx.grad.dtype == x.dtype and aa.grad.dtype == a.dtype and bb.grad.dtype == b.dtype, label
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y_ref = residual_reference(x64, a64, b64, fa.double(), fb.double(), form, activation)
    y_ref.backward(go.double())
    sy1, sg1, kink1, s_num, s_den, kink_den = bounds(x, a, b, go, form)
    sy0, sg0, kink0, *_ = bounds(x, fa, fb, go, form)
    phi_y, phi_g = _phi_scales(x, go, activation)
    rnd = INTERP_ROUND[x.dtype] if round_rel is None else round_rel
    out = {}
    for name, got, ref, scale, mask in (
        ("y", y.detach(), y_ref.detach(), sy1 + sy0 + phi_y, None),
        ("grad_x", xx.grad, x64.grad, sg1 + sg0 + phi_g, kink1 | kink0),
    ):
        assert torch.equal(torch.isfinite(got), torch.isfinite(ref)), f"{label} {name}: non-finite"
        err = (got.double() - ref).abs()
        tol = rnd * (ref.abs() + RTOL * scale) + RTOL * scale + FLOOR[x.dtype]
        if mask is not None:
            err = err.masked_fill(mask, 0.0)
        ratio = err / (tol + 1e-300)
        assert (ratio <= 1).all(), (
            f"{label} {name}: {int((ratio > 1).sum())} elements out of bounds; worst "
            f"err {err.max().item():.3g}, ratio {ratio.max().item():.3g}"
        )
        out[name] = (err.max().item(), ratio.max().item())
    for name, got, ref, s, extra in (
        ("grad_numerator", aa.grad, a64.grad, s_num, torch.zeros_like(s_num)),
        ("grad_denominator", bb.grad, b64.grad, s_den, kink_den),
    ):
        err = (got.double() - ref).abs()
        ratio = err / (COEF_RTOL * s + extra + 1e-30)
        assert (ratio <= 1).all(), f"{label} {name}: err {err} vs S {s}"
        assert err.max() <= 1e-4 * ref.abs().max() + extra.max() + 1e-30, f"{label} {name}: err {err.max()}"
        out[name] = (err.max().item(), ratio.max().item())
    return out


def fit_pair(groups, m, n, seed, spread=0.1):
    """Trained coefficients and a fit near them (the residual form's situation after some training)."""
    a, b = make_coefficients(groups, m, n, seed=seed)
    da, db = make_coefficients(groups, m, n, seed=seed + 1000, scale=spread)
    return a, b, a - da, b - db


# x shape, G, degrees: one group, several groups per tile (odd sizes), one group per channel (G = D)
CASES = [((4, 40), 1, (5, 4)), ((3, 5, 24), 2, (5, 4)), ((2, 3, 16), 16, (5, 4))]


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, **_ids)
@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("activation", KERNEL_ACTIVATIONS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_residual_matches_reference(case, activation, form, dtype):
    shape, groups, (m, n) = CASES[case]
    gen = torch.Generator().manual_seed(200 + case)
    x = (torch.randn(shape, generator=gen) * 2.0).to(dtype)
    go = torch.randn(shape, generator=gen).to(dtype)
    a, b, fa, fb = fit_pair(groups, m, n, seed=case)
    check_residual(
        tk.residual_triton,
        x,
        a,
        b,
        fa,
        fb,
        go,
        form,
        activation,
        f"residual {activation} {form} {dtype} {shape} G={groups}",
    )


def _edge_inputs(dtype):
    """x with zeros, tiny and huge magnitudes (1e4: phi saturates, exp underflows/overflows), zero coefficients."""
    gen = torch.Generator().manual_seed(8)
    mags = torch.tensor([0.0, 1e-3, 0.5, 3.0, 30.0, 300.0, 1e4])
    x = mags[torch.randint(0, len(mags), (3, 48), generator=gen)]
    x = x * torch.where(torch.rand(x.shape, generator=gen) < 0.5, -1.0, 1.0)
    x[:, ::5] = 0.0
    go = torch.randn(x.shape, generator=gen)
    a, b, fa, fb = fit_pair(4, 5, 4, seed=12)
    for t in (b, fb):
        t[0, :3] = 0.0
        t[:, 3] = t[:, 3].sign() * t[:, 3].abs().clamp(min=0.5)
    a[:, 5] = a[:, 5].clamp(-0.5, 0.5)
    fa[:, 5] = fa[:, 5].clamp(-0.5, 0.5)
    return x.to(dtype), go.to(dtype), a, b, fa, fb


@interpreted
@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("activation", KERNEL_ACTIVATIONS)
def test_residual_edge_values(activation, form):
    x, go, a, b, fa, fb = _edge_inputs(torch.float32)
    check_residual(tk.residual_triton, x, a, b, fa, fb, go, form, activation, f"residual edge {activation} {form}")


def _run(fn, x, a, b, fa, fb, go, form, activation):
    xx, aa, bb = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y = fn(xx, aa, bb, fa, fb, form, activation)
    y.backward(go)
    return y.detach(), xx.grad, aa.grad, bb.grad


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, **_ids)
@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("activation", KERNEL_ACTIVATIONS)
def test_residual_exact_at_equal_coefficients(activation, form, dtype):
    """numerator == fit numerator and denominator == fit denominator (bitwise): the difference of the rationals is
    exactly 0, so y and grad_x do not depend on the coefficients at all (two unrelated equal pairs give the same
    bits), are exactly 0 with "none", and are phi(x) and go phi'(x) (torch's, to float32 rounding)."""
    x, go, *_ = _edge_inputs(dtype)
    x = torch.cat([x, (torch.randn(2, 48, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)])
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    runs = []
    for seed in (0, 1):
        a, b = make_coefficients(4, 5, 4, seed=30 + seed, scale=1.0)
        runs.append(_run(tk.residual_triton, x, a, b, a.clone(), b.clone(), go, form, activation))
        assert torch.isfinite(runs[-1][0]).all() and torch.isfinite(runs[-1][1]).all()
    (y, gx, ga, _), (y2, gx2, ga2, _) = runs
    assert torch.equal(y, y2) and torch.equal(gx, gx2)
    assert not torch.equal(ga, ga2)  # the coefficient gradients are R's, not 0: they depend on the coefficients
    if activation == "none":
        assert (y == 0).all() and (gx == 0).all()
    else:  # phi and go phi' as torch has them (float64 of the rounded inputs), to float32 rounding
        for name, got, want in (
            ("y", y, activation_value(x.double(), activation)),
            ("grad_x", gx, activation_backward(go.double(), x.double(), activation)),
        ):
            err = (got.double() - want).abs()
            tol = INTERP_ROUND[dtype] * want.abs() + 1e-6 * (1 + want.abs())
            assert (err <= tol).all(), f"{name}: up to {err.max().item():.3g} from torch's"


@interpreted
@pytest.mark.parametrize("form", ["A", "B"])
def test_residual_against_the_plain_kernel(form):
    """The residual form's own rational is the plain kernel's bit for bit: with a fit that is exactly 0 (numerator
    0) and "none", y and grad_x are those of rational_triton; for any fit the coefficient gradients are."""
    gen = torch.Generator().manual_seed(21)
    x, go = torch.randn(5, 24, generator=gen) * 2, torch.randn(5, 24, generator=gen)
    a, b, fa, fb = fit_pair(3, 5, 4, seed=21)
    xx, aa, bb = (t.clone().requires_grad_() for t in (x, a, b))
    y = tk.rational_triton(xx, aa, bb, form)
    y.backward(go)
    plain = (y.detach(), xx.grad, aa.grad, bb.grad)
    zero_fit = _run(tk.residual_triton, x, a, b, torch.zeros_like(fa), fb, go, form, "none")
    assert all(torch.equal(p, r) for p, r in zip(plain, zero_fit))
    for activation in ("gelu", "relu"):
        _, _, ga, gb = _run(tk.residual_triton, x, a, b, fa, fb, go, form, activation)
        assert torch.equal(ga, plain[2]) and torch.equal(gb, plain[3])


@interpreted
def test_residual_deterministic_and_non_contiguous():
    """Several row programs each reduce a strip of rows: three runs give bit-identical results; a non-contiguous
    input gives those of its contiguous copy."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 16, generator=gen) * 2  # D = 16: 128-row tiles, 3 row programs
    go = torch.randn(x.shape, generator=gen)
    a, b, fa, fb = fit_pair(4, 5, 4, seed=4)
    assert tk._tile(16)[0] * 2 < x.shape[0]
    runs = [_run(tk.residual_triton, x, a, b, fa, fb, go, "A", "gelu") for _ in range(3)]
    assert all(torch.equal(r, s) for run in runs[1:] for r, s in zip(run, runs[0]))
    check_residual(tk.residual_triton, x, a, b, fa, fb, go, "A", "gelu", "residual 300 rows")
    base = torch.randn(4, 9, 16, generator=gen)
    xs = base.transpose(0, 1)[:, ::2]
    assert not xs.is_contiguous()
    gos = torch.randn(xs.shape, generator=gen)
    got = _run(tk.residual_triton, xs, a, b, fa, fb, gos, "B", "silu")
    want = _run(tk.residual_triton, xs.contiguous(), a, b, fa, fb, gos, "B", "silu")
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@interpreted
def test_residual_routing_and_frozen_fit():
    """float64 and degrees beyond the kernels' limits go to residual_torch; the fit takes no gradient."""
    from nora.kernels import residual_torch

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    a, b, fa, fb = fit_pair(2, 5, 4, seed=5)
    a, b, fa, fb = (t.double() for t in (a, b, fa, fb))
    assert torch.equal(tk.residual_triton(x, a, b, fa, fb, "A", "gelu"), residual_torch(x, a, b, fa, fb, "A", "gelu"))
    a9, b9, fa9, fb9 = fit_pair(2, 9, 4, seed=6)  # 10 numerator coefficients > MAX_NUM_COEFFS
    xf = x.float()
    assert torch.equal(
        tk.residual_triton_checked(xf, a9, b9, fa9, fb9, "B", "silu"), residual_torch(xf, a9, b9, fa9, fb9, "B", "silu")
    )
    with pytest.raises(ValueError):
        tk.residual_triton(xf, a.float(), b.float(), fa.float(), fb.float(), "A", "tanh")
    fa_g = fa.float().requires_grad_()
    y = tk.residual_triton(xf, a.float(), b.float(), fa_g, fb.float(), "A", "gelu")
    with pytest.raises(RuntimeError, match="frozen"):
        y.sum().backward()


@interpreted
def test_residual_saves_only_x_and_coefficients(monkeypatch):
    monkeypatch.setattr(tk.RESIDUAL_SAFETY_NET, "verdicts", {})
    x = torch.randn(2, 3, 8).requires_grad_()
    a, b, fa, fb = fit_pair(2, 5, 4, seed=0)
    a.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        tk.residual_triton_checked(x, a, b, fa, fb, "A", "gelu_tanh")
    assert [c.name for c in tk.RESIDUAL_SAFETY_NET.verdicts.values()] == ["triton"]
    assert sum(t.numel() * t.element_size() for t in saved) == x.numel() * 4 + 2 * (a.numel() + b.numel()) * 4


@interpreted
def test_residual_op_passes_opcheck():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 24, generator=gen).requires_grad_()
    a, b, fa, fb = fit_pair(3, 5, 4, seed=9)
    a.requires_grad_()
    b.requires_grad_()
    torch.library.opcheck(tk.residual_triton_op, (x, a, b, fa, fb, "A", "gelu"))
    go = torch.randn(x.shape, generator=gen)
    torch.library.opcheck(
        tk.residual_triton_op.backward_op, (x.detach(), a.detach(), b.detach(), fa, fb, go, "B", "silu", True)
    )


# ------------------------------------------------------------------ the safety net of the residual form
def _residual_fwd_without_phi(
    X,
    Y,
    NUM,
    DEN,
    FNUM,
    FDEN,
    R,
    D,
    C,
    N_DB,
    M1: tl.constexpr,
    N: tl.constexpr,
    FORM_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """A wrong residual forward (the real one's signature; it leaves phi out): runs, disagrees unless "none"."""
    tk._fwd_body(X, Y, NUM, DEN, FNUM, FDEN, R, D, C, N_DB, M1, N, FORM_B, True, 0, BLOCK_R, BLOCK_D)


def _fallback_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "failed its self-check" in str(w.message)]


@interpreted
def test_residual_self_check_accepts_the_real_kernels(monkeypatch):
    """No false alarm, also where the two rationals are equal (y = phi exactly) or nearly so (their float32
    difference is exact only to their size, far below the difference's own size)."""
    monkeypatch.setattr(tk.RESIDUAL_SAFETY_NET, "verdicts", {})
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(6, 24, generator=gen) * 3
    a, b, fa, fb = fit_pair(4, 5, 4, seed=10)
    near = (a + 1e-6 * torch.randn(a.shape, generator=gen), b)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in DTYPES:
            for form in "AB":
                for activation in KERNEL_ACTIVATIONS:
                    for fit in ((fa, fb), (a.clone(), b.clone()), near):
                        tk.RESIDUAL_SAFETY_NET.verdicts.clear()
                        tk.RESIDUAL_SAFETY_NET.choose(x.to(dtype), a, b, *fit, form, activation)
                        assert [c.name for c in tk.RESIDUAL_SAFETY_NET.verdicts.values()] == ["triton"]
    assert not _fallback_warnings(caught), _fallback_warnings(caught)


@interpreted
def test_residual_mismatch_falls_back(monkeypatch):
    """A residual forward that leaves phi out is caught on the first call of its shape class (one warning naming
    the activation); the torch.compile fallback (here the reference math it compiles) serves the calls; "none",
    where that kernel happens to be right, keeps running Triton; the plain rational's net is not involved."""
    from nora.kernels import safety

    monkeypatch.setattr(tk.RESIDUAL_SAFETY_NET, "verdicts", {})
    monkeypatch.setattr(tk.SAFETY_NET, "verdicts", {})
    real = tk._residual_kernels()
    monkeypatch.setitem(tk._RESIDUAL_KERNELS, True, (triton.jit(_residual_fwd_without_phi), real[1]))
    used = []

    def compiled_stand_in(*args):
        used.append(args[-1])
        return residual_reference(*args)

    monkeypatch.setattr(safety, "compiled_residual_reference", compiled_stand_in)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 40, generator=gen)
    a, b, fa, fb = fit_pair(2, 5, 4, seed=11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = tk.residual_triton_checked(x, a, b, fa, fb, "A", "gelu")
        y_none = tk.residual_triton_checked(x, a, b, fa, fb, "A", "none")
    msgs = _fallback_warnings(caught)
    assert (
        len(msgs) == 1
        and "the triton residual kernel failed its self-check on cpu, D=40, G=2, degrees (5,4), "
        "float32, form A, activation gelu (output differs from the reference"
        in msgs[0]
    ), msgs
    assert msgs[0].endswith("using torch.compile for this shape class instead")
    assert used and used[-1] == "gelu"
    torch.testing.assert_close(y, residual_reference(x, a, b, fa, fb, "A", "gelu"), rtol=0, atol=0)
    torch.testing.assert_close(y_none, tk.residual_triton(x, a, b, fa, fb, "A", "none"), rtol=0, atol=0)
    verdicts = {k[-1]: c.name for k, c in tk.RESIDUAL_SAFETY_NET.verdicts.items()}
    assert verdicts == {"gelu": "torch.compile", "none": "triton"} and not tk.SAFETY_NET.verdicts


@interpreted
def test_residual_build_failure_falls_back_to_torch(monkeypatch):
    """Neither the kernels nor torch.compile build: two warnings, then residual_torch bit for bit."""
    from nora.kernels import residual_torch, safety

    monkeypatch.setattr(tk.RESIDUAL_SAFETY_NET, "verdicts", {})

    def broken(*args, **kwargs):
        raise RuntimeError("CompilationError: no kernel today")

    monkeypatch.setattr(tk, "_residual_kernels", broken)
    monkeypatch.setattr(safety, "compiled_residual_reference", broken)
    gen = torch.Generator().manual_seed(12)
    x, go = torch.randn(4, 24, generator=gen), torch.randn(4, 24, generator=gen)
    a, b, fa, fb = fit_pair(3, 5, 4, seed=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _run(tk.residual_triton_checked, x, a, b, fa, fb, go, "B", "silu")
    msgs = _fallback_warnings(caught)
    assert (
        len(msgs) == 2 and "no kernel today" in msgs[0] and msgs[1].endswith("using torch for this shape class instead")
    ), msgs
    want = _run(residual_torch, x, a, b, fa, fb, go, "B", "silu")
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@interpreted
def test_residual_checked_compiles_without_graph_breaks(monkeypatch):
    """Under torch.compile(fullgraph=True) the self-check runs at trace time on a synthetic slice, the graph holds
    the Triton residual op, and compiled gradients equal eager ones."""
    monkeypatch.setattr(tk.RESIDUAL_SAFETY_NET, "verdicts", {})
    gen = torch.Generator().manual_seed(13)
    x, go = torch.randn(2, 5, 24, generator=gen), torch.randn(2, 5, 24, generator=gen)
    a, b, fa, fb = fit_pair(24, 5, 4, seed=13)

    def f(x, a, b):
        return tk.residual_triton_checked(x * 1.5, a, b, fa, fb, "A", "gelu").sin()

    want = _run(lambda x, a, b, *rest: f(x, a, b), x, a, b, fa, fb, go, "A", "gelu")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(x, a, b)
    assert explained.graph_break_count == 0, explained.break_reasons
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("nora.residual_triton" in o for o in ops), sorted(ops)
    assert [c.name for c in tk.RESIDUAL_SAFETY_NET.verdicts.values()] == ["triton"]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = _run(lambda x, a, b, *rest: compiled(x, a, b), x, a, b, fa, fb, go, "A", "gelu")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ outside the interpreter
@pytest.mark.skipif(INTERPRET, reason="checks the non-interpreted registration")
def test_residual_registration():
    from nora.kernels import _REGISTRY, backend_names

    assert "triton" in backend_names()
    assert _REGISTRY["triton"].residual is tk.residual_triton_checked
    assert set(tk.ACT_CODES) == set(KERNEL_ACTIVATIONS)
    if not torch.cuda.is_available():
        a, b, fa, fb = fit_pair(2, 5, 4, seed=0)
        with pytest.raises(ValueError, match="CUDA"):
            tk.residual_triton(torch.randn(2, 8), a, b, fa, fb, "A", "gelu")


def _compile_for_cuda(kernel, names, constexprs, xdtype="*bf16"):
    """Build ``kernel`` for sm_90 with Triton's bundled ptxas (no GPU needed): the compiled-mode front end
    (constexpr branches, device functions, tl.math.erf) and the code generation the interpreter never exercises."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def kind(n):
        if n in constexprs:
            return "constexpr"
        if n in ("X", "Y", "GO", "GX"):
            return xdtype
        return "*fp32" if n in ("NUM", "DEN", "FNUM", "FDEN", "PART") else "i32"

    src = ASTSource(fn=kernel, signature={n: kind(n) for n in names}, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": tk.NUM_WARPS})


@pytest.mark.skipif(INTERPRET, reason="compiles for CUDA (outside the interpreter)")
def test_kernels_build_for_cuda():
    """Every residual activation, both forms, forward and backward (and the plain kernels) build to a cubin."""
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401

        assert knobs.nvidia.ptxas.path  # raises without a ptxas (triton's wheels bundle one)
    except Exception as exc:  # pragma: no cover - a triton without the NVIDIA backend or its ptxas
        pytest.skip(f"triton cannot build for CUDA here ({exc})")
    fwd, bwd = tk._kernels()
    rfwd, rbwd = tk._residual_kernels()
    base = dict(M1=6, N=4, BLOCK_R=16, BLOCK_D=128)
    fwd_names = ["X", "Y", "NUM", "DEN", "R", "D", "C", "N_DB", "M1", "N", "FORM_B", "BLOCK_R", "BLOCK_D"]
    bwd_names = [
        "X",
        "GO",
        "GX",
        "NUM",
        "DEN",
        "PART",
        "R",
        "D",
        "C",
        "N_DB",
        "N_RP",
        "ITERS",
        "M1",
        "N",
        "FORM_B",
        "NEED_COEF",
        "BLOCK_R",
        "BLOCK_D",
    ]
    rfwd_names = fwd_names[:4] + ["FNUM", "FDEN"] + fwd_names[4:11] + ["ACT"] + fwd_names[11:]
    rbwd_names = bwd_names[:5] + ["FNUM", "FDEN"] + bwd_names[5:16] + ["ACT"] + bwd_names[16:]
    builds = [(fwd, fwd_names, dict(base, FORM_B=False)), (bwd, bwd_names, dict(base, FORM_B=True, NEED_COEF=True))]
    for act in tk.ACT_CODES.values():
        for form_b in (False, True):
            builds.append((rfwd, rfwd_names, dict(base, FORM_B=form_b, ACT=act)))
            builds.append((rbwd, rbwd_names, dict(base, FORM_B=form_b, ACT=act, NEED_COEF=act != 2)))
    for kernel, names, consts in builds:
        assert _compile_for_cuda(kernel, names, consts).asm.get("cubin"), (kernel, consts)
