"""Rational-activation backends against the float64 reference.

Oracle: ``rational_reference`` on float64 copies of the (already rounded) inputs, differentiated by
plain autograd (independent of the hand-derived gradients the backends implement).

Error bounds (stated per quantity; eps-level float32 math, then rounding to the input dtype):

* outputs and grad_x: ``|out - ref| <= ROUND[dtype] * (|ref| + 1e-5 * scale) + 1e-5 * scale + FLOOR``
  where ``scale`` is the float64 condition scale of the quantity (the same expression evaluated
  with |a_i|, |b_j|, |x|, so cancellation inside P, P' or R is accounted for; for a well-conditioned
  element scale ~ |ref|): 1e-5 is ~170 float32 ulps, ROUND is the half-ulp of the output dtype
  (0 for float32, 2^-8 for bfloat16, 2^-11 for float16), FLOOR = 2^-25 for float16 subnormals.
  In form B the derivative jumps where R(x) = 0; elements with |R| <= 1e-4 * sum|b_j x^j| (where
  float32 rounding may pick either side) are left out of the grad_x comparison.
* coefficient gradients (float32 for every input dtype, summed over each group):
  ``|g - ref| <= 2e-5 * S + kink`` with ``S`` the sum of the absolute values of the summed terms (the
  natural bound for a float32 summation) and ``kink`` twice the absolute terms of the form-B kink
  elements above; additionally ``max|g - ref| <= 1e-4 * max|ref|`` (relative to the norm).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fixtures import require_cpu_extension

from nora.kernels import available_backends, rational, resolve_backend
from nora.rational.functional import rational_reference

ROOT = Path(__file__).resolve().parents[1]
ROUND = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FLOOR = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-25}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RTOL = 1e-5
COEF_RTOL = 2e-5


def _cpu_built() -> bool:
    return "cpu" in available_backends("cpu")


CPU_BACKENDS = ["reference", "torch", "cpu"]


def _skip_unbuilt(backend: str):
    if backend == "cpu":
        require_cpu_extension()  # skips locally, fails under CI=true


# --------------------------------------------------------------------------- oracle and bounds
def _horner(coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_i coeffs[:, i] x^i for coeffs (G, k), x (N, G, C); zero if k == 0."""
    out = torch.zeros_like(x)
    for i in range(coeffs.shape[1] - 1, -1, -1):
        out = out * x + coeffs[:, i].unsqueeze(-1)
    return out


def oracle(x, a, b, go, form):
    """float64 reference values and autograd gradients on copies of the given (rounded) inputs."""
    x64 = x.detach().double().requires_grad_()
    a64 = a.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    y = rational_reference(x64, a64, b64, form)
    y.backward(go.detach().double())
    return y.detach(), x64.grad, a64.grad, b64.grad


def bounds(x, a, b, go, form):
    """Condition scales of y and grad_x, abs-term sums of the coefficient grads, form-B kink mask."""
    g = a.shape[0]
    xg = x.detach().double().reshape(-1, g, x.shape[-1] // g)
    gog = go.detach().double().reshape(xg.shape).abs()
    ax = xg.abs()
    a_abs, b_abs = a.detach().double().abs(), b.detach().double().abs()
    m1, n = a.shape[1], b.shape[1]
    i_m = torch.arange(1, m1, dtype=torch.float64)
    j_n = torch.arange(1, n + 1, dtype=torch.float64)
    abs_p = _horner(a_abs, ax)
    abs_dp = _horner(a_abs[:, 1:] * i_m, ax)
    abs_r = _horner(b_abs, ax) * ax
    abs_dr = _horner(b_abs * j_n, ax)
    if form == "A":
        q = 1.0 + abs_r
        kink = torch.zeros_like(xg, dtype=torch.bool)
    else:
        r = _horner(b.detach().double(), xg) * xg
        q = 1.0 + r.abs()
        kink = r.abs() <= 1e-4 * abs_r
    cond_q = 1.0 + abs_r / q
    scale_y = abs_p / q * cond_q
    scale_gx = gog * (abs_dp / q + abs_dr * abs_p / q**2) * cond_q
    s_num = torch.stack([(gog * ax**i / q).sum(dim=(0, 2)) for i in range(m1)], dim=1)
    den_terms = [gog * ax**j * abs_p / q**2 for j in range(1, n + 1)]
    s_den = torch.stack([t.sum(dim=(0, 2)) for t in den_terms], dim=1)
    kink_den = torch.stack([(2 * t * kink).sum(dim=(0, 2)) for t in den_terms], dim=1)
    shape = x.shape
    return scale_y.reshape(shape), scale_gx.reshape(shape), kink.reshape(shape), s_num, s_den, kink_den


def check_against_reference(fn, x, a, b, go, form, label="", round_rel=None):
    """Run fn forward+backward and assert every bound of the module docstring (``round_rel``
    overrides the output rounding allowance ROUND[dtype])."""
    xx = x.detach().clone().requires_grad_()
    aa = a.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_()
    y = fn(xx, aa, bb, form)
    assert y.dtype == x.dtype and y.shape == x.shape, label
    y.backward(go)
    assert xx.grad.dtype == x.dtype and aa.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32
    y_ref, gx_ref, ga_ref, gb_ref = oracle(x, a, b, go, form)
    scale_y, scale_gx, kink, s_num, s_den, kink_den = bounds(x, a, b, go, form)
    rnd, floor = (ROUND[x.dtype] if round_rel is None else round_rel), FLOOR[x.dtype]

    def close(out, ref, scale, name, mask=None):
        assert torch.isfinite(out).all() == torch.isfinite(ref).all(), f"{label} {name}: non-finite"
        err = (out.double() - ref).abs()
        tol = rnd * (ref.abs() + RTOL * scale) + RTOL * scale + floor
        bad = err > tol
        if mask is not None:
            bad &= ~mask
        assert not bad.any(), (
            f"{label} {name}: {int(bad.sum())} elements out of bounds; worst "
            f"err {err[bad].max().item():.3g} vs tol {tol[bad].min().item():.3g}"
        )

    close(y.detach(), y_ref, scale_y, "y")
    close(xx.grad, gx_ref, scale_gx, "grad_x", kink)
    for name, got, ref, s, extra in (
        ("grad_numerator", aa.grad, ga_ref, s_num, 0.0),
        ("grad_denominator", bb.grad, gb_ref, s_den, kink_den),
    ):
        extra = extra if torch.is_tensor(extra) else torch.zeros_like(ref)
        err = (got.double() - ref).abs()
        assert (err <= COEF_RTOL * s + extra + 1e-30).all(), f"{label} {name}: err {err} vs S {s}"
        assert err.max() <= 1e-4 * ref.abs().max() + extra.max() + 1e-30, (
            f"{label} {name}: err {err.max()} vs norm {ref.abs().max()}"
        )


def make_coefficients(groups, m, n, seed, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(groups, m + 1, generator=gen) * scale
    b = torch.randn(groups, n, generator=gen) * scale
    return a, b


# shapes, groups, degrees: odd sizes (not multiples of any vector width or tile), G = 1, G = D,
# wide groups (C > 4096: split into column sub-blocks), degrees other than (5, 4)
CASES = [
    ((4, 37, 48), 8, (5, 4)),
    ((3, 1001), 1, (5, 4)),
    ((2, 5, 64), 64, (5, 4)),
    ((2, 9000), 2, (5, 4)),
    ((6, 7, 30), 3, (3, 2)),
    ((5, 40), 4, (7, 7)),
    ((3, 11, 12), 2, (0, 1)),
    ((2, 3, 18), 6, (2, 6)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_backend_matches_reference(backend, dtype, form, case):
    _skip_unbuilt(backend)
    shape, groups, (m, n) = CASES[case]
    gen = torch.Generator().manual_seed(1000 + case)
    x = (torch.randn(shape, generator=gen) * 2.0).to(dtype)
    go = torch.randn(shape, generator=gen).to(dtype)
    a, b = make_coefficients(groups, m, n, seed=case)
    fn = resolve_backend(backend, "cpu").fn
    check_against_reference(fn, x, a, b, go, form, f"{backend} {dtype} {form} {shape} G={groups} ({m},{n})")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("form", ["A", "B"])
def test_edge_values(backend, dtype, form):
    """x = 0 exactly, b_j = 0 exactly, |x| up to 1e4: finite everywhere and within bounds."""
    _skip_unbuilt(backend)
    groups, c = 4, 40
    gen = torch.Generator().manual_seed(7)
    mags = torch.tensor([0.0, 1e-3, 0.5, 1.0, 3.0, 30.0, 300.0, 1e3, 5e3, 1e4])
    x = mags[torch.randint(0, len(mags), (6, groups * c), generator=gen)]
    x = x * torch.where(torch.rand(x.shape, generator=gen) < 0.5, -1.0, 1.0)
    x[:, ::7] = 0.0
    x = x.to(dtype)
    go = torch.randn(x.shape, generator=gen).to(dtype)
    a, b = make_coefficients(groups, 5, 4, seed=11)
    b[0, :3] = 0.0  # b_1..b_3 = 0 in group 0
    b[1, 1] = 0.0
    b[2, 0] = 0.0
    b[:, 3] = b[:, 3].sign() * b[:, 3].abs().clamp(min=0.5)  # keeps |F| ~ |a_5/b_4| |x| in float16 range
    a[:, 5] = a[:, 5].clamp(-0.5, 0.5)
    fn = resolve_backend(backend, "cpu").fn
    xx = x.clone().requires_grad_()
    aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
    y = fn(xx, aa, bb, form)
    y.backward(go)
    for t in (y, xx.grad, aa.grad, bb.grad):
        assert torch.isfinite(t).all()
    check_against_reference(fn, x, a, b, go, form, f"edge {backend} {dtype} {form}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", ["A", "B"])
def test_non_contiguous_inputs(backend, form):
    _skip_unbuilt(backend)
    fn = resolve_backend(backend, "cpu").fn
    gen = torch.Generator().manual_seed(3)
    a, b = make_coefficients(4, 5, 4, seed=5)
    base = torch.randn(6, 20, 32, generator=gen)
    for x in (base[:, ::3, :], base.transpose(0, 1), base[..., :16].transpose(1, 2)):
        assert not x.is_contiguous()
        d = x.shape[-1]
        aa, bb = a[: 4 if d % 4 == 0 else 1], b[: 4 if d % 4 == 0 else 1]
        go = torch.randn(x.shape, generator=gen)
        check_against_reference(fn, x, aa, bb, go, form, f"non-contiguous {backend} {tuple(x.stride())}")
    # a shared numerator expanded to (G, m+1) (a stride-0 view) gets its gradient summed
    shared = torch.randn(1, 6, generator=gen).requires_grad_()
    x = torch.randn(5, 32, generator=gen)
    y = fn(x, shared.expand(4, 6), b, form)
    y.sum().backward()
    ref = shared.detach().clone().requires_grad_()
    rational_reference(x.double(), ref.double().expand(4, 6), b.double(), form).sum().backward()
    torch.testing.assert_close(shared.grad, ref.grad, rtol=1e-5, atol=1e-5)


def test_cpu_backend_is_deterministic():
    """Coefficient gradients bit-identical over 3 runs and for 1 or 2 threads (fixed-size work items)."""
    _skip_unbuilt("cpu")
    fn = resolve_backend("cpu", "cpu").fn
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 50, 96, generator=gen)
    go = torch.randn(x.shape, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for nt in (threads, threads, threads, 1, 2):
            torch.set_num_threads(nt)
            for form in "AB":
                a, b = make_coefficients(8, 5, 4, seed=1)
                a.requires_grad_(), b.requires_grad_()
                xx = x.clone().requires_grad_()
                fn(xx, a, b, form).backward(go)
                results.append((form, xx.grad, a.grad, b.grad))
    finally:
        torch.set_num_threads(threads)
    for form in "AB":
        runs = [r for r in results if r[0] == form]
        for r in runs[1:]:
            for got, first in zip(r[1:], runs[0][1:]):
                assert torch.equal(got, first)


def test_generic_degree_path_is_deterministic():
    _skip_unbuilt("cpu")
    fn = resolve_backend("cpu", "cpu").fn
    x = torch.randn(40, 300, generator=torch.Generator().manual_seed(2))
    outs = []
    for _ in range(3):
        a, b = make_coefficients(3, 3, 2, seed=4)
        a.requires_grad_(), b.requires_grad_()
        fn(x, a, b, "A").sum().backward()
        outs.append((a.grad, b.grad))
    assert all(torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1]) for o in outs)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_saves_only_x_for_backward(backend):
    """Saved-for-backward: x and the two small coefficient tensors, nothing else."""
    _skip_unbuilt(backend)
    fn = resolve_backend(backend, "cpu").fn
    x = torch.randn(8, 64, 96).requires_grad_()
    a, b = make_coefficients(8, 5, 4, seed=0)
    a.requires_grad_(), b.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x, a, b, "A")
    total = sum(t.numel() * t.element_size() for t in saved)
    assert total == x.numel() * 4 + (a.numel() + b.numel()) * 4
    y.sum().backward()


def test_cpu_float64_is_routed_to_torch():
    _skip_unbuilt("cpu")
    x = torch.randn(4, 16, dtype=torch.float64)
    a, b = make_coefficients(2, 5, 4, seed=0)
    y = resolve_backend("cpu", "cpu").fn(x, a.double(), b.double(), "A")
    torch.testing.assert_close(y, rational_reference(x, a.double(), b.double(), "A"))


def test_auto_prefers_the_fused_cpu_backend():
    _skip_unbuilt("cpu")
    assert resolve_backend("auto", "cpu").name == "cpu"
    assert available_backends("cpu")[0] == "cpu"
    x = torch.randn(3, 16)
    a, b = make_coefficients(4, 5, 4, seed=0)
    torch.testing.assert_close(rational(x, a, b, "A"), rational_reference(x, a, b, "A"), rtol=1e-5, atol=1e-6)


def test_empty_input():
    _skip_unbuilt("cpu")
    x = torch.empty(0, 16, requires_grad=True)
    a, b = make_coefficients(4, 5, 4, seed=0)
    a.requires_grad_()
    y = resolve_backend("cpu", "cpu").fn(x, a, b, "A")
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("bad", ["input", "numerator", "denominator"])
def test_integer_tensors_are_rejected(backend, bad):
    """Integer math would truncate P/Q (the torch and reference backends used to return truncated integers)."""
    if backend == "triton":  # checks dtypes before it looks at the device, so it runs on the CPU too
        fn = pytest.importorskip("nora.kernels.triton").rational_triton
    else:
        _skip_unbuilt(backend)
        fn = resolve_backend(backend, "cpu").fn
    a, b = make_coefficients(2, 5, 4, seed=0)
    args = {"input": torch.linspace(-3, 3, 16).reshape(2, 8), "numerator": a, "denominator": b}
    args[bad] = args[bad].round().long()
    with pytest.raises(TypeError, match=f"floating-point tensors; the {bad} is torch.int64"):
        fn(args["input"], args["numerator"], args["denominator"], "A")


@pytest.mark.slow  # 14 s here: end to end (make test-slow, CI)
def test_ci_fails_instead_of_skipping_when_the_extension_cannot_build():
    """Under CI=true a failed build of the fused CPU extension fails its tests (a real failed build:
    NORA_NO_BUILD=1 in a fresh process); without CI they skip."""
    test = "tests/test_kernels.py::test_cpu_float64_is_routed_to_torch"
    for ci, want in (("true", "1 failed"), ("", "1 skipped")):
        env = dict(os.environ, CI=ci, NORA_NO_BUILD="1")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        out = subprocess.run(
            [sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider", "-rfs"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
            env=env,
        )
        assert want in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
        assert "disabled by NORA_NO_BUILD=1" in out.stdout
        assert ("CI=true: a build failure fails the tests" in out.stdout) == (ci == "true")


@pytest.mark.slow
def test_safety_net_falls_back_to_a_real_torch_compile():
    """The real middle of the fallback chain (about 30 s of inductor compile on the CPU): a kernel that fails
    on its first call is replaced, with one warning, by torch.compile of the reference math, which passes the
    same self-check and serves the calls with the reference's values and gradients."""
    import warnings

    from nora.kernels.safety import SafetyNet

    def launch_fails(*args):
        raise RuntimeError("triton.compiler.errors.CompilationError: at 12:8: unsupported")

    net = SafetyNet("broken", launch_fails, launch_fails, launch_fails)
    gen = torch.Generator().manual_seed(2)
    x, go = torch.randn(5, 24, generator=gen), torch.randn(5, 24, generator=gen)
    a, b = make_coefficients(4, 5, 4, seed=9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = net.choose(x, a, b, "A")
        assert net.choose(x[:2], a, b, "A") is fn  # decided once per shape class
    msgs = [str(w.message) for w in caught if "self-check" in str(w.message)]
    assert len(msgs) == 1 and "CompilationError: at 12:8" in msgs[0] and "using torch.compile" in msgs[0]
    check_against_reference(fn, x, a, b, go, "A", "torch.compile fallback")


def _run_python(code: str, env_extra: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def test_no_build_falls_back_to_torch_with_one_warning():
    code = """
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            from nora.kernels import rational, resolve_backend, available_backends
            names = [resolve_backend("auto", "cpu").name for _ in range(3)]
            available_backends("cpu")
            x = torch.randn(2, 8)
            a, b = torch.randn(2, 6), torch.randn(2, 4)
            rational(x, a, b, "A"); rational(x, a, b, "B")
        msgs = [str(w.message) for w in caught]
        print("NAMES", names)
        print("WARNINGS", len(msgs))
        for m in msgs:
            print("W:", m)
    """
    out = _run_python(code, {"NORA_NO_BUILD": "1", "NORA_BACKEND": ""})
    assert out.returncode == 0, out.stderr
    assert "NAMES ['torch', 'torch', 'torch']" in out.stdout, out.stdout
    assert "WARNINGS 1" in out.stdout, out.stdout
    assert "NORA_NO_BUILD" in out.stdout


@pytest.mark.slow
def test_concurrent_builds_share_one_cache(tmp_path):
    """Two processes building into an empty cache at once: both load, one build (file lock)."""
    code = """
        import nora.kernels.cpu as c
        c.load_extension()
        print("OK", c._module.__file__)
    """
    env = {"NORA_CACHE_DIR": str(tmp_path), "NORA_NO_BUILD": ""}
    procs = []
    for _ in range(2):
        e = dict(os.environ)
        e.update(env)
        e["PYTHONPATH"] = str(ROOT)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(code)],
                env=e,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    files = {o[0].split("OK", 1)[1].strip() for o in outs}
    assert len(files) == 1
    assert len(list(tmp_path.glob("ext/*/BUILD_OK"))) == 1


@pytest.mark.slow  # 24 s here: end to end (make test-slow, CI)
def test_bench_kernels_smoke(tmp_path):
    """python -m nora.bench kernels on a tiny shape: table, JSON with ratios, saved bytes, floors."""
    import json

    from nora.bench.kernels import main

    out = tmp_path / "bench.json"
    impls = "gelu,silu,reference,stacked_powers,torch" + (",cpu" if _cpu_built() else "")
    assert (
        main(
            [
                "--device",
                "cpu",
                "--shapes",
                "4x10x48:8,3x40:2:bfloat16",
                "--repeats",
                "2",
                "--warmup",
                "1",
                "--impls",
                impls,
                "--bandwidth-mb",
                "16",
                "--groups-sweep",
                "4x10x48:1/8/48",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["complete"] and report["copy_bandwidth_GBps"] > 0 and report["hardware"]["cpu"]
    for shape in report["shapes"]:
        rows = {r["impl"]: r for r in shape["rows"]}
        assert rows["gelu"]["fwd_bwd_ratio_vs_gelu"] == 1.0
        assert set(impls.split(",")) <= set(rows)
        for r in rows.values():
            assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and 0 < r["fwd_bwd_bandwidth_fraction"]
        assert rows["reference"]["saved_ratio_vs_gelu"] > 5  # plain autograd keeps every intermediate
        coef_bytes = 4 * shape["groups"] * 10  # (G, 6) + (G, 4) float32
        assert rows["torch"]["saved_bytes"] - rows["gelu"]["saved_bytes"] == coef_bytes
        if "cpu" in rows:
            assert rows["cpu"]["saved_bytes"] - rows["gelu"]["saved_bytes"] == coef_bytes
    # the sweep over G (fused backend against GELU), up to one group per channel, with a target per G
    if _cpu_built():
        (sweep,) = report["groups_sweep"]
        assert sweep["shape"] == [4, 10, 48] and set(sweep["by_groups"]) == {"1", "8", "48"}
        assert all(r["fwd_bwd_ratio_vs_gelu"] > 0 for r in sweep["by_groups"].values())
        assert {f"cpu_fwd_bwd_ratio_vs_gelu@4x10x48:float32:G={g}" for g in (1, 8, 48)} <= set(report["targets"])


def test_bench_dispatch():
    from nora.bench.__main__ import main

    assert main([]) == 0
    assert main(["no-such-benchmark"]) == 2
    try:
        import nora.bench.train_step  # noqa: F401
    except ModuleNotFoundError:
        assert main(["train"]) == 2  # clear message, no traceback
