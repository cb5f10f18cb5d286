"""The residual form ``phi(x) + (R(x) - R_fit(x))`` of the fused ``cpu`` backend (and of the ``torch`` backend).

Oracle: ``residual_reference`` on float64 copies of the (already rounded) inputs, differentiated by plain autograd.
Error bounds, as in ``test_kernels.py`` (whose condition scales are reused), per rational: ``RTOL * scale`` for each of
R and R_fit, plus for the activation ``PHI_TOL(x) = 1e-6 * max(1, |x|)`` (times ``|grad_out|`` for grad_x), plus the
float32 rounding of the final sum (2^-23 |ref|), plus the rounding to the output dtype (ROUND[dtype] * |ref|). The
coefficient gradients are R's alone and are checked as in ``test_kernels.py``.

Exactness (the point of the form): with the fit's coefficients bitwise equal to the trained ones, R - R_fit is 0.0 in
every lane, so y and grad_x are exactly the kernel's phi(x) and grad_out * phi'(x) (those of zero coefficients, R = 0),
and exactly 0 with ``activation="none"``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fixtures import require_cpu_extension
from test_kernels import COEF_RTOL, DTYPES, FLOOR, ROUND, RTOL, bounds, make_coefficients

from nora.kernels import residual_rational, residual_torch_op
from nora.rational.functional import KERNEL_ACTIVATIONS, residual_backward, residual_reference

ACTS = KERNEL_ACTIVATIONS
EPS32 = 2.0**-23


@pytest.fixture(autouse=True)
def _needs_extension(request):
    if not request.node.name.startswith("test_torch_backend"):
        require_cpu_extension()  # skips locally, fails under CI=true


def _cpu():
    from nora.kernels.cpu import residual_cpu

    return residual_cpu


def _fit_of(a, b, seed, rel=0.05):
    """A fit close to the trained coefficients (as after some training), not equal to them."""
    gen = torch.Generator().manual_seed(seed)
    return a * (1 + rel * torch.randn(a.shape, generator=gen)), b * (1 + rel * torch.randn(b.shape, generator=gen))


def phi_tol(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "none":
        return torch.zeros_like(x, dtype=torch.float64)
    return 1e-6 * x.detach().double().abs().clamp(min=1.0)


def oracle(x, a, b, fa, fb, go, form, activation):
    x64 = x.detach().double().requires_grad_()
    a64 = a.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    y = residual_reference(x64, a64, b64, fa.double(), fb.double(), form, activation)
    y.backward(go.detach().double())
    return y.detach(), x64.grad, a64.grad, b64.grad


def check_residual(fn, x, a, b, fa, fb, go, form, activation, label=""):
    """Forward + backward of ``fn`` against the float64 oracle within the bounds of the module docstring."""
    xx = x.detach().clone().requires_grad_()
    aa = a.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_()
    y = fn(xx, aa, bb, fa, fb, form, activation)
    assert y.dtype == x.dtype and y.shape == x.shape, label
    y.backward(go)
    assert xx.grad.dtype == x.dtype and aa.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32, label
    y_ref, gx_ref, ga_ref, gb_ref = oracle(x, a, b, fa, fb, go, form, activation)
    sy1, sgx1, kink1, s_num, s_den, kink_den = bounds(x, a, b, go, form)
    sy0, sgx0, kink0, _, _, _ = bounds(x, fa, fb, go, form)
    rnd, floor = ROUND[x.dtype], FLOOR[x.dtype]
    pt = phi_tol(x, activation)
    g_abs = go.detach().double().abs()

    def close(out, ref, scale, extra, name, mask=None):
        assert (torch.isfinite(out) == torch.isfinite(ref)).all(), f"{label} {name}: non-finite"
        err = (out.double() - ref).abs()
        tol = rnd * (ref.abs() + RTOL * scale + extra) + RTOL * scale + extra + EPS32 * ref.abs() + floor
        bad = err > tol
        if mask is not None:
            bad &= ~mask
        assert not bad.any(), (
            f"{label} {name}: {int(bad.sum())} elements out of bounds; worst err "
            f"{err[bad].max().item():.3g} vs tol {tol[bad].min().item():.3g}"
        )

    close(y.detach(), y_ref, sy1 + sy0, pt, "y")
    close(xx.grad, gx_ref, sgx1 + sgx0, g_abs * pt, "grad_x", kink1 | kink0)
    for name, got, ref, s, extra in (
        ("grad_numerator", aa.grad, ga_ref, s_num, torch.zeros_like(ga_ref)),
        ("grad_denominator", bb.grad, gb_ref, s_den, kink_den),
    ):
        err = (got.double() - ref).abs()
        assert (err <= COEF_RTOL * s + extra + 1e-30).all(), f"{label} {name}: err {err} vs S {s}"
        assert err.max() <= 1e-4 * ref.abs().max() + extra.max() + 1e-30, f"{label} {name}"


# shapes and groups: G = 1, G = 8, G = D (one rational per channel), widths that are no multiple of the SIMD width,
# a wide row (9000 channels: several channel blocks), and degrees other than (5, 4) (the generic kernels)
CASES = [
    ((4, 37, 48), 8, (5, 4)),
    ((3, 1001), 1, (5, 4)),
    ((2, 5, 64), 64, (5, 4)),
    ((2, 9000), 8, (5, 4)),
    ((6, 7, 30), 3, (3, 2)),
    ((5, 40), 40, (7, 7)),
]


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cpu_matches_float64_reference(activation, dtype, form, case):
    shape, groups, (m, n) = CASES[case]
    gen = torch.Generator().manual_seed(2000 + case)
    x = (torch.randn(shape, generator=gen) * 2.5).to(dtype)
    go = torch.randn(shape, generator=gen).to(dtype)
    a, b = make_coefficients(groups, m, n, seed=case)
    fa, fb = _fit_of(a, b, seed=case)
    check_residual(
        _cpu(), x, a, b, fa, fb, go, form, activation, f"cpu {activation} {dtype} {form} {shape} G={groups} ({m},{n})"
    )


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("form", ["A", "B"])
def test_torch_backend_matches_float64_reference(activation, form):
    shape, groups, (m, n) = CASES[0]
    gen = torch.Generator().manual_seed(7)
    x, go = torch.randn(shape, generator=gen) * 2.5, torch.randn(shape, generator=gen)
    a, b = make_coefficients(groups, m, n, seed=3)
    fa, fb = _fit_of(a, b, seed=3)
    fn = lambda *args: residual_rational(*args, backend="torch")  # noqa: E731
    check_residual(fn, x, a, b, fa, fb, go, form, activation, f"torch {activation} {form}")


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("form", ["A", "B"])
def test_cpu_agrees_with_the_torch_backend(activation, form):
    """float32, the same inputs: the two backends' y and gradients agree (their activations are different float32
    implementations of the same functions, within PHI_TOL of each other)."""
    gen = torch.Generator().manual_seed(11)
    x, go = torch.randn(6, 50, 96, generator=gen) * 3, torch.randn(6, 50, 96, generator=gen)
    a, b = make_coefficients(8, 5, 4, seed=11)
    fa, fb = _fit_of(a, b, seed=12)
    outs = []
    for backend in ("cpu", "torch"):
        xx, aa, bb = (t.clone().requires_grad_() for t in (x, a, b))
        y = residual_rational(xx, aa, bb, fa, fb, form, activation, backend=backend)
        y.backward(go)
        outs.append((y.detach(), xx.grad, aa.grad, bb.grad))
    (y1, gx1, ga1, gb1), (y2, gx2, ga2, gb2) = outs
    pt = phi_tol(x, activation)
    sy1, sgx1, kink1, _, _, _ = bounds(x, a, b, go, form)
    sy0, sgx0, kink0, _, _, _ = bounds(x, fa, fb, go, form)
    err_y = (y1.double() - y2.double()).abs()
    assert (err_y <= 2 * pt + 2 * RTOL * (sy1 + sy0) + EPS32 * y2.double().abs()).all()
    err_g = (gx1.double() - gx2.double()).abs()
    ok = err_g <= go.double().abs() * 2 * pt + 2 * RTOL * (sgx1 + sgx0) + EPS32 * gx2.double().abs()
    assert (ok | kink1 | kink0).all()
    torch.testing.assert_close(ga1, ga2, rtol=1e-4, atol=1e-4 * ga2.abs().max().item())
    torch.testing.assert_close(gb1, gb2, rtol=1e-4, atol=1e-4 * gb2.abs().max().item())


# --------------------------------------------------------------------------- exactness
def _run(x, a, b, fa, fb, form, activation, go):
    xx, aa, bb = (t.clone().requires_grad_() for t in (x, a, b))
    y = _cpu()(xx, aa, bb, fa, fb, form, activation)
    y.backward(go)
    return y.detach(), xx.grad, aa.grad, bb.grad


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("degrees", [(5, 4), (3, 2)], ids=lambda d: f"{d[0]}-{d[1]}")
def test_equal_coefficients_give_phi_exactly(activation, degrees):
    """Fit == trained coefficients bitwise: y is exactly the kernel's phi(x) (the output with zero coefficients, for
    which R = 0) and grad_x exactly grad_out * phi'(x), in every dtype, both forms, |x| up to 1e4, x = 0 included;
    with activation 'none' both are exactly 0. The coefficient gradients are bit for bit the plain kernel's."""
    from nora.kernels.cpu import rational_cpu

    m, n = degrees
    gen = torch.Generator().manual_seed(5)
    x0 = torch.cat(
        [
            torch.linspace(-60, 60, 1201),
            torch.randn(3000, generator=gen) * 4,
            torch.tensor([0.0, -0.0, 1e3, -1e3, 1e4, -1e4, 1e-30, -1e-30, 3.3, -7.5]),
        ]
    )
    x0 = x0[: x0.numel() // 40 * 40].reshape(-1, 40)
    for dtype in DTYPES:
        x = x0.to(dtype)
        go = torch.randn(x.shape, generator=gen).to(dtype)
        for form in "AB":
            a, b = make_coefficients(8, m, n, seed=21)
            b[0, 0] = 0.0
            y, gx, ga, gb = _run(x, a, b, a.clone(), b.clone(), form, activation, go)
            z = torch.zeros_like
            y0, gx0, _, _ = _run(x, z(a), z(b), z(a), z(b), form, activation, go)
            label = f"{activation} {dtype} {form}"
            assert torch.isfinite(y).all() and torch.isfinite(gx).all(), label
            assert torch.equal(y, y0) and torch.equal(gx, gx0), label
            if activation == "none":
                assert (y == 0).all() and (gx == 0).all(), label
            xx, aa, bb = (t.clone().requires_grad_() for t in (x, a, b))
            rational_cpu(xx, aa, bb, form).backward(go)
            assert torch.equal(ga, aa.grad) and torch.equal(gb, bb.grad), label


def test_none_with_equal_coefficients_is_zero_on_random_inputs():
    """activation 'none', fit == trained: exactly 0.0 forward and backward, fp32 and bf16, many coefficient sets."""
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        a, b = make_coefficients(4, 5, 4, seed=100 + seed, scale=2.0)
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(9, 64, generator=gen) * 10 ** (seed % 3)).to(dtype)
            go = torch.randn(x.shape, generator=gen).to(dtype)
            for form in "AB":
                y, gx, _, _ = _run(x, a, b, a.clone(), b.clone(), form, "none", go)
                assert (y == 0).all() and (gx == 0).all(), (seed, dtype, form)


# --------------------------------------------------------------------------- the activations themselves
def _phi_inputs():
    dense = torch.linspace(-60, 60, 240_001)
    tails = torch.tensor([1e2, 3e2, 1e3, 1e4, 1e6, 1e10, 1e20, 1e30, 1e38, 3e38, 1e-20, 1e-38, 1e-40])
    return torch.cat([dense, tails, -tails, torch.tensor([0.0, -0.0])])


def _truth(x64: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    if activation == "gelu":
        cdf = 0.5 * torch.special.erfc(-x64 / math.sqrt(2))
        return x64 * cdf, cdf + x64 * torch.exp(-0.5 * x64 * x64) / math.sqrt(2 * math.pi)
    if activation == "gelu_tanh":
        k = math.sqrt(2 / math.pi)
        th = torch.tanh(k * (x64 + 0.044715 * x64**3))
        d = 0.5 * (1 + th) + 0.5 * x64 * (1 - th * th) * k * (1 + 3 * 0.044715 * x64 * x64)
        return 0.5 * x64 * (1 + th), torch.where(x64.abs() > 1e10, (x64 > 0).double(), d)
    if activation == "silu":
        s = torch.sigmoid(x64)
        return x64 * s, s * (1 + x64 * (1 - s))
    return torch.relu(x64), (x64 > 0).double()


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "relu"])
def test_activation_accuracy(activation):
    """Zero coefficients (R = R_fit = 0): y = phi(x), grad_x = phi'(x) (grad_out = 1). Against torch's float32
    F.gelu / F.gelu(approximate='tanh') / F.silu / relu and aten's gelu_backward / silu_backward, and against the
    float64 functions: |error| <= 1e-6 max(1, |x|) on [-60, 60] (dense) and in the tails up to 3e38; finite for
    every finite x (torch's own gelu_tanh backward is NaN beyond |x| ~ 1e13: compared with float64 there)."""
    x = _phi_inputs().reshape(1, -1)
    z = torch.zeros(1, 6), torch.zeros(1, 4)
    xx = x.clone().requires_grad_()
    y = _cpu()(xx, *z, *z, "A", activation)
    y.backward(torch.ones_like(y))
    gx = xx.grad
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()
    tol = 1e-6 * x.double().abs().clamp(min=1.0)
    ones = torch.ones_like(x)
    torch_y = {"gelu": F.gelu(x), "gelu_tanh": F.gelu(x, approximate="tanh"), "silu": F.silu(x), "relu": torch.relu(x)}[
        activation
    ]
    torch_g = {
        "gelu": lambda: torch.ops.aten.gelu_backward(ones, x),
        "gelu_tanh": lambda: torch.ops.aten.gelu_backward(ones, x, approximate="tanh"),
        "silu": lambda: torch.ops.aten.silu_backward(ones, x),
        "relu": lambda: torch.where(x > 0, ones, torch.zeros_like(x)),
    }[activation]()
    t_y, t_g = _truth(x.double(), activation)
    for name, got, ref in (("phi", y, torch_y), ("phi'", gx, torch_g)):
        fin = torch.isfinite(ref)
        err = (got.double() - ref.double()).abs()
        assert (err[fin] <= tol[fin]).all(), f"{activation} {name} vs torch: max err/tol {(err / tol)[fin].max()}"
    for name, got, ref in (("phi", y, t_y), ("phi'", gx, t_g)):
        err = (got.double() - ref).abs()
        assert (err <= tol).all(), f"{activation} {name} vs float64: max err/tol {(err / tol).max()}"
    if activation == "relu":  # relu'(0) = 0, as torch
        assert gx[0, -2:].eq(0).all() and y[0, -2:].eq(0).all()


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_inf_and_nan_inputs_behave_like_the_reference(activation, dtype):
    """+-inf and NaN inputs: y as residual_reference on the same input and grad_x as the hand-derived
    residual_backward (the torch backend's), NaNs compared equal, finite values close; coefficient gradients NaN
    exactly where the reference's are."""
    x = torch.tensor(
        [
            [float("inf"), -float("inf"), float("nan"), 0.0, 1.5, -2.0, 1e3, -1e3],
            [0.5, -0.25, 3.0, -3.0, float("nan"), 7.0, -7.0, 0.0],
        ]
    ).to(dtype)
    go = torch.ones_like(x)
    a, b = make_coefficients(2, 5, 4, seed=8)
    fa, fb = _fit_of(a, b, seed=9)
    for form in "AB":
        y, gx, ga, gb = _run(x, a, b, fa, fb, form, activation, go)
        y_ref = residual_reference(x, a, b, fa, fb, form, activation)
        gx_ref, ga_ref, gb_ref = residual_backward(x, a, b, fa, fb, go, form, activation)
        torch.testing.assert_close(y, y_ref, equal_nan=True, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(gx, gx_ref, equal_nan=True, rtol=1e-2, atol=1e-3)
        assert torch.equal(ga.isnan(), ga_ref.isnan()) and torch.equal(gb.isnan(), gb_ref.isnan())


# --------------------------------------------------------------------------- layout, routing, errors
@pytest.mark.parametrize("form", ["A", "B"])
def test_non_contiguous_and_empty_inputs(form):
    gen = torch.Generator().manual_seed(3)
    a, b = make_coefficients(4, 5, 4, seed=5)
    fa, fb = _fit_of(a, b, seed=6)
    base = torch.randn(6, 20, 32, generator=gen) * 2
    for x in (base[:, ::3, :], base.transpose(0, 1), base[..., :16].transpose(1, 2)):
        assert not x.is_contiguous()
        g = 4 if x.shape[-1] % 4 == 0 else 1
        go = torch.randn(x.shape, generator=gen)
        check_residual(_cpu(), x, a[:g], b[:g], fa[:g], fb[:g], go, form, "gelu", f"non-contiguous {x.stride()}")
    x = torch.empty(0, 16, requires_grad=True)
    aa = a.clone().requires_grad_()
    y = _cpu()(x, aa, b, fa, fb, form, "silu")
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(aa.grad, torch.zeros_like(a)) and x.grad.shape == (0, 16)


def test_routing_and_errors():
    """float64 and degrees beyond the kernel's go to the torch backend (float64: with its float64 gradients); a fit
    that asks for a gradient is an error."""
    cpu = _cpu()
    a, b = make_coefficients(2, 5, 4, seed=0)
    fa, fb = _fit_of(a, b, seed=1)
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    a64 = a.double().requires_grad_()
    y = residual_rational(x, a64, b.double(), fa.double(), fb.double(), "A", "gelu", backend="cpu")
    assert any("residual_torch" in str(n.name()) for n in [y.grad_fn] if n is not None), y.grad_fn
    torch.testing.assert_close(y, residual_reference(x, a64, b.double(), fa.double(), fb.double(), "A", "gelu"))
    a17, b17 = make_coefficients(2, 17, 4, seed=2)
    x32 = torch.randn(4, 16)
    torch.testing.assert_close(
        cpu(x32, a17, b17, a17 * 0.9, b17, "A", "silu"),
        residual_reference(x32, a17, b17, a17 * 0.9, b17, "A", "silu"),
        rtol=1e-4,
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="unknown kernel activation"):
        cpu(x32, a, b, fa, fb, "A", "tanh")
    with pytest.raises(RuntimeError, match="fit coefficients are frozen"):
        cpu(x32, a, b, fa.clone().requires_grad_(), fb, "A", "gelu").sum().backward()


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("form", ["A", "B"])
def test_torch_backend_gradcheck_float64(activation, form):
    """torch.autograd.gradcheck of the torch backend's residual op in float64 (the cpu backend routes float64 there);
    inputs away from the kinks (relu at 0, |x| at 0, form B's R = 0)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(3, 8, generator=gen, dtype=torch.float64) * 1.6 + 0.2
    x = (x * torch.where(torch.rand(3, 8, generator=gen) < 0.5, -1.0, 1.0)).requires_grad_()
    a = (0.4 * torch.randn(2, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    b = (0.4 * torch.rand(2, 4, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    fa, fb = a.detach() * 1.1, b.detach() * 0.9
    assert torch.autograd.gradcheck(lambda x, a, b: residual_torch_op(x, a, b, fa, fb, form, activation), (x, a, b))


# --------------------------------------------------------------------------- determinism, torch.compile
def test_bit_identical_across_runs_and_thread_counts():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 50, 96, generator=gen) * 2
    go = torch.randn(x.shape, generator=gen)
    a, b = make_coefficients(8, 5, 4, seed=1)
    fa, fb = _fit_of(a, b, seed=2)
    threads = torch.get_num_threads()
    results = {}
    try:
        for nt in (threads, threads, 1, 2):
            torch.set_num_threads(nt)
            for form, act in (("A", "gelu"), ("B", "silu")):
                for dtype in (torch.float32, torch.bfloat16):
                    results.setdefault((form, act, dtype), []).append(
                        _run(x.to(dtype), a, b, fa, fb, form, act, go.to(dtype))
                    )
    finally:
        torch.set_num_threads(threads)
    for key, runs in results.items():
        for r in runs[1:]:
            assert all(torch.equal(u, v) for u, v in zip(r, runs[0])), key


def test_opcheck():
    from nora.kernels.cpu import residual_cpu_op

    gen = torch.Generator().manual_seed(0)
    for dtype, form, act in ((torch.float32, "A", "gelu"), (torch.bfloat16, "B", "silu")):
        x = torch.randn(3, 5, 16, generator=gen).to(dtype).requires_grad_()
        a = (0.3 * torch.randn(4, 6, generator=gen)).requires_grad_()
        b = (0.3 * torch.randn(4, 4, generator=gen)).requires_grad_()
        fa, fb = _fit_of(a.detach(), b.detach(), seed=3)
        torch.library.opcheck(residual_cpu_op, (x, a, b, fa, fb, form, act))
        go = torch.randn(x.shape, generator=gen).to(dtype)
        torch.library.opcheck(
            residual_cpu_op.backward_op, (x.detach(), a.detach(), b.detach(), fa, fb, go, form, act, True)
        )


def test_torch_compile_fullgraph_no_graph_breaks():
    """A function calling residual_rational(..., backend='cpu') compiles with fullgraph=True into one graph (no
    break) that calls nora.residual_cpu; the compiled outputs and gradients equal eager's."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 12, 32, generator=gen)
    a0, b0 = make_coefficients(4, 5, 4, seed=4)
    fa, fb = _fit_of(a0, b0, seed=5)
    w = torch.randn(32, 32, generator=gen) * 0.2

    def step(x, a, b):
        h = residual_rational(x @ w, a, b, fa, fb, "A", "gelu", backend="cpu")
        return residual_rational(h, a, b, fa, fb, "B", "silu", backend="cpu").square().mean()

    def run(fn):
        x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
        loss = fn(x, a, b)
        loss.backward()
        return loss.detach(), x.grad, a.grad, b.grad

    want = run(step)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(*(t.clone().requires_grad_() for t in (x0, a0, b0)))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = {str(node.target) for g in explained.graphs for node in g.graph.nodes if node.op == "call_function"}
    assert any("nora.residual_cpu" in o for o in ops), sorted(ops)
    torch._dynamo.reset()
    got = run(torch.compile(step, fullgraph=True))
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
