"""Correctness checks of the Triton rational kernels against the float64 reference, and a short benchmark of
them against GELU (helper of ``scripts/gpu_check.sh``; self-contained: needs torch and triton only, no pytest).

    python scripts/gpu_check.py correctness [--json PATH]     # CUDA: small and large shapes
    TRITON_INTERPRET=1 python scripts/gpu_check.py interpret  # CPU interpreter, small shapes (+ a benchmark smoke)
    python scripts/gpu_check.py bench [--json PATH]           # CUDA: fwd+bwd vs GELU, bf16, G=8 and G=D

Every case runs forward and backward through ``nora.kernels.triton.rational_triton`` and compares
with ``rational_reference`` evaluated in float64 on copies of the same (rounded) inputs,
differentiated by autograd. Bounds (as in tests/test_kernels.py): outputs and grad_x within
``ROUND*(|ref| + 1e-5*scale) + 1e-5*scale`` (scale: the float64 condition scale of the quantity;
ROUND: half an ulp of the output dtype, a whole bfloat16 ulp under the interpreter, which truncates);
coefficient gradients within ``2e-5 * sum|terms|``. Each case reports its worst error/bound ratio
(<= 1 passes). Also checks bit-identical coefficient gradients over 3 runs.

The residual form ``phi(x) + (R(x) - R_fit(x))`` (``residual_triton``, every activation the kernels evaluate) is
checked the same way against ``residual_reference`` (as tests/test_kernels_triton_residual.py: the scale adds both
rationals' condition scales and the size of phi's terms; the float64 oracle runs in row chunks, so the LLaMA shape
fits), plus its exactness at equal coefficients (numerator == fit numerator, denominator == fit denominator: y and
grad_x bit-identical for two unrelated such pairs, exactly 0 with "none", phi(x) and go phi'(x) to float32
rounding otherwise) and bit-identical results over 3 runs.

``bench`` times forward and forward+backward (gradients of x and both coefficient tensors) of GELU, the plain
rational (``rational_triton``, form A) and the residual form (``residual_triton``, form A, activation gelu) at
ViT-Tiny's 64 x 197 x 768 and LLaMA-3-8B's MLP shape 4 x 2048 x 14336 in bfloat16, with G = 8 and one rational per
channel (G = D): interleaved rounds, medians, ratios to GELU and the achieved GB/s of the least traffic (forward:
read x, write y; backward: read x and grad_y, write grad_x).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nora.logs import setup_logging  # noqa: E402
from nora.rational.functional import rational_reference  # noqa: E402

log = logging.getLogger(__name__)

RTOL, COEF_RTOL = 1e-5, 2e-5
ROUND = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FLOOR = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-25}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

SMALL = [
    ((3, 5, 24), 4, (5, 4)),
    ((7, 40), 1, (5, 4)),
    ((2, 3, 6), 6, (5, 4)),
    ((5, 300), 3, (3, 2)),
    ((4, 20), 2, (7, 7)),
    ((3, 17), 1, (0, 1)),
]
LARGE = [((64, 197, 768), 8, (5, 4)), ((2, 512, 14336), 8, (5, 4)), ((8, 1000), 1000, (5, 4))]
LLAMA = ((4, 2048, 14336), 8, (5, 4))  # bfloat16 only (memory of the float64 oracle)


def _horner(coeffs, x):
    out = torch.zeros_like(x)
    for i in range(coeffs.shape[1] - 1, -1, -1):
        out = out * x + coeffs[:, i].unsqueeze(-1)
    return out


def check_case(fn, x, a, b, go, form, round_rel=None) -> dict:
    """Worst error/bound ratio per quantity for one case (all <= 1 passes)."""
    xx, aa, bb = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y = fn(xx, aa, bb, form)
    y.backward(go)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y_ref = rational_reference(x64, a64, b64, form)
    y_ref.backward(go.double())
    with torch.no_grad():
        g = a.shape[0]
        xg = x.double().reshape(-1, g, x.shape[-1] // g)
        gog = go.double().reshape(xg.shape).abs()
        ax = xg.abs()
        a_abs, b_abs = a.double().abs(), b.double().abs()
        m1, n = a.shape[1], b.shape[1]
        dev = x.device
        abs_p = _horner(a_abs, ax)
        abs_dp = _horner(a_abs[:, 1:] * torch.arange(1, m1, dtype=torch.float64, device=dev), ax)
        abs_r = _horner(b_abs, ax) * ax
        abs_dr = _horner(b_abs * torch.arange(1, n + 1, dtype=torch.float64, device=dev), ax)
        if form == "A":
            q = 1.0 + abs_r
            kink = torch.zeros_like(xg, dtype=torch.bool)
        else:
            r = _horner(b.double(), xg) * xg
            q = 1.0 + r.abs()
            kink = r.abs() <= 1e-4 * abs_r
        cond = 1.0 + abs_r / q
        scale_y = (abs_p / q * cond).reshape(x.shape)
        scale_gx = (gog * (abs_dp / q + abs_dr * abs_p / q**2) * cond).reshape(x.shape)
        s_num = torch.stack([(gog * ax**i / q).sum(dim=(0, 2)) for i in range(m1)], 1)
        den_terms = [gog * ax**j * abs_p / q**2 for j in range(1, n + 1)]
        s_den = torch.stack([t.sum(dim=(0, 2)) for t in den_terms], 1)
        kink_den = torch.stack([(2 * t * kink).sum(dim=(0, 2)) for t in den_terms], 1)
        rnd = ROUND[x.dtype] if round_rel is None else round_rel
        out = {}
        for name, got, ref, scale, mask in (
            ("y", y, y_ref, scale_y, None),
            ("grad_x", xx.grad, x64.grad, scale_gx, kink.reshape(x.shape)),
        ):
            err = (got.double() - ref).abs()
            tol = rnd * (ref.abs() + RTOL * scale) + RTOL * scale + FLOOR[x.dtype] + 1e-300
            ratio = err / tol
            if mask is not None:
                ratio = ratio.masked_fill(mask, 0.0)
            ratio = torch.nan_to_num(ratio, nan=float("inf"))
            finite_ok = bool((torch.isfinite(got) == torch.isfinite(ref)).all())
            out[name] = float(ratio.max()) if finite_ok else float("inf")
        for name, got, ref, s, extra in (
            ("grad_numerator", aa.grad, a64.grad, s_num, 0.0),
            ("grad_denominator", bb.grad, b64.grad, s_den, kink_den),
        ):
            err = (got.double() - ref).abs()
            out[name] = float(torch.nan_to_num((err / (COEF_RTOL * s + extra + 1e-300)).max(), nan=float("inf")))
    out["worst"] = max(out.values())
    out["pass"] = out["worst"] <= 1.0
    return out


def _coefs(groups, m, n, seed, device):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(groups, m + 1, generator=gen) * 0.5
    b = torch.randn(groups, n, generator=gen) * 0.5
    return a.to(device), b.to(device)


def _inputs(shape, dtype, seed, device, edge=False):
    gen = torch.Generator().manual_seed(seed)
    if edge:
        mags = torch.tensor([0.0, 1e-3, 0.5, 3.0, 300.0, 1e3, 1e4])
        x = mags[torch.randint(0, len(mags), shape, generator=gen)]
        x = x * torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    else:
        x = torch.randn(shape, generator=gen) * 2.0
    go = torch.randn(shape, generator=gen)
    return x.to(device=device, dtype=dtype), go.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- the residual form
ACTIVATIONS = ("none", "gelu", "gelu_tanh", "silu", "relu")
RESIDUAL_SMALL = ((3, 5, 24), 4, (5, 4))  # every activation, both forms, float32 and bfloat16
# (shape, G, dtype, activation, form): large shapes on CUDA, one case each (every case builds its own kernels)
RESIDUAL_LARGE = [
    ((64, 197, 768), 8, torch.bfloat16, "gelu", "A"),
    ((64, 197, 768), 8, torch.bfloat16, "silu", "B"),
    ((2, 512, 14336), 8, torch.bfloat16, "gelu_tanh", "A"),
    ((2, 512, 14336), 14336, torch.bfloat16, "gelu", "A"),
    ((8, 1000), 1000, torch.float32, "relu", "B"),
    ((8, 1000), 1000, torch.float32, "none", "A"),
    ((3, 5, 24), 4, torch.float16, "gelu", "A"),
    (LLAMA[0], 8, torch.bfloat16, "gelu", "A"),
]
ORACLE_CHUNK = 1 << 22  # elements per chunk of the float64 oracle


def _rational_bounds(xg, gog, a, b, form):
    """float64 condition scales of y and grad_x of one rational on grouped x (N, G, C), its abs-term sums of the
    coefficient gradients (G, m+1), (G, n) and the form-B kink mask (as tests/test_kernels.py)."""
    ax = xg.abs()
    a_abs, b_abs = a.abs(), b.abs()
    m1, n = a.shape[1], b.shape[1]
    dev = xg.device
    abs_p = _horner(a_abs, ax)
    abs_dp = _horner(a_abs[:, 1:] * torch.arange(1, m1, dtype=torch.float64, device=dev), ax)
    abs_r = _horner(b_abs, ax) * ax
    abs_dr = _horner(b_abs * torch.arange(1, n + 1, dtype=torch.float64, device=dev), ax)
    if form == "A":
        q = 1.0 + abs_r
        kink = torch.zeros_like(xg, dtype=torch.bool)
    else:
        r = _horner(b, xg) * xg
        q = 1.0 + r.abs()
        kink = r.abs() <= 1e-4 * abs_r
    cond = 1.0 + abs_r / q
    scale_y = abs_p / q * cond
    scale_gx = gog * (abs_dp / q + abs_dr * abs_p / q**2) * cond
    s_num = torch.stack([(gog * ax**i / q).sum(dim=(0, 2)) for i in range(m1)], 1)
    den_terms = [gog * ax**j * abs_p / q**2 for j in range(1, n + 1)]
    s_den = torch.stack([t.sum(dim=(0, 2)) for t in den_terms], 1)
    kink_den = torch.stack([(2 * t * kink).sum(dim=(0, 2)) for t in den_terms], 1)
    return scale_y, scale_gx, kink, s_num, s_den, kink_den


def _phi_scales(x, gog, activation):
    """Sizes of phi's float32 evaluation (float64): |x| for phi, |go| times the sum of phi''s terms for grad_x."""
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
    else:
        d = torch.ones_like(x)
    return x.abs(), gog * d


def _run_residual(fn, x, a, b, fa, fb, go, form, activation):
    xx, aa, bb = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y = fn(xx, aa, bb, fa, fb, form, activation)
    y.backward(go)
    return y.detach(), xx.grad, aa.grad, bb.grad


def check_residual_case(fn, x, a, b, fa, fb, go, form, activation, round_rel=None) -> dict:
    """Worst error/bound ratio per quantity of the residual form for one case (all <= 1 passes); the float64
    oracle (residual_reference, autograd) and the bounds run over chunks of rows."""
    from nora.rational.functional import residual_reference

    y, gx, ga, gb = _run_residual(fn, x, a, b, fa, fb, go, form, activation)
    g, d = a.shape[0], x.shape[-1]
    rows = x.numel() // d
    chunk = max(1, ORACLE_CHUNK // d)
    a64, b64, fa64, fb64 = (t.detach().double() for t in (a, b, fa, fb))
    rnd = ROUND[x.dtype] if round_rel is None else round_rel
    worst = {"y": 0.0, "grad_x": 0.0}
    ga_ref, gb_ref = torch.zeros_like(a64), torch.zeros_like(b64)
    s_num, s_den, kink_den = torch.zeros_like(a64), torch.zeros_like(b64), torch.zeros_like(b64)
    finite_ok = True
    flat = [t.reshape(rows, d) for t in (x, go, y, gx)]
    for r0 in range(0, rows, chunk):
        xc, goc, yc, gxc = (t[r0 : r0 + chunk] for t in flat)
        x64 = xc.double().requires_grad_()
        aa, bb = a64.clone().requires_grad_(), b64.clone().requires_grad_()
        y_ref = residual_reference(x64, aa, bb, fa64, fb64, form, activation)
        y_ref.backward(goc.double())
        with torch.no_grad():
            xg = xc.double().reshape(-1, g, d // g)
            gog = goc.double().reshape(xg.shape).abs()
            sy1, sg1, kink1, sn, sd, kd = _rational_bounds(xg, gog, a64, b64, form)
            sy0, sg0, kink0, *_ = _rational_bounds(xg, gog, fa64, fb64, form)
            phi_y, phi_g = _phi_scales(xg, gog, activation)
            ga_ref += aa.grad
            gb_ref += bb.grad
            s_num += sn
            s_den += sd
            kink_den += kd
            for name, got, ref, scale, mask in (
                ("y", yc, y_ref, sy1 + sy0 + phi_y, None),
                ("grad_x", gxc, x64.grad, sg1 + sg0 + phi_g, kink1 | kink0),
            ):
                ref, scale = ref.reshape(got.shape), scale.reshape(got.shape)
                err = (got.double() - ref).abs()
                tol = rnd * (ref.abs() + RTOL * scale) + RTOL * scale + FLOOR[x.dtype] + 1e-300
                ratio = err / tol
                if mask is not None:
                    ratio = ratio.masked_fill(mask.reshape(got.shape), 0.0)
                ratio = torch.nan_to_num(ratio, nan=float("inf"))
                finite_ok &= bool((torch.isfinite(got) == torch.isfinite(ref)).all())
                worst[name] = max(worst[name], float(ratio.max()))
        del x64, y_ref, aa, bb
    out = {k: (v if finite_ok else float("inf")) for k, v in worst.items()}
    for name, got, ref, s, extra in (
        ("grad_numerator", ga, ga_ref, s_num, 0.0),
        ("grad_denominator", gb, gb_ref, s_den, kink_den),
    ):
        err = (got.double() - ref).abs()
        out[name] = float(torch.nan_to_num((err / (COEF_RTOL * s + extra + 1e-300)).max(), nan=float("inf")))
    out["worst"] = max(out.values())
    out["pass"] = out["worst"] <= 1.0
    return out


def check_residual_exact(fn, x, go, form, activation, seed, device) -> dict:
    """Equal trained and fit coefficients: y and grad_x bit-identical for two unrelated such pairs, exactly 0 with
    "none", otherwise phi(x) and go phi'(x) as torch computes them (float64 of the rounded inputs) to within
    float32 rounding plus the output dtype's rounding; the worst of those deviations relative to that bound."""
    from nora.rational.functional import activation_backward, activation_value

    g = 4 if x.shape[-1] % 4 == 0 else 1
    runs = []
    for k in range(2):
        a, b = _coefs(g, 5, 4, seed + k, device)
        a, b = 2 * a, 2 * b
        runs.append(_run_residual(fn, x, a, b, a.clone(), b.clone(), go, form, activation))
    (y, gx, *_), (y2, gx2, *_) = runs
    out = {"coefficient-independent": bool(torch.equal(y, y2) and torch.equal(gx, gx2))}
    if activation == "none":
        out["exactly 0"] = bool((y == 0).all() and (gx == 0).all())
        out["worst"] = 0.0 if all(out.values()) else float("inf")
    else:
        rnd = ROUND[x.dtype]
        worst = 0.0
        for got, want in (
            (y, activation_value(x.double(), activation)),
            (gx, activation_backward(go.double(), x.double(), activation)),
        ):
            tol = 2 * rnd * want.abs() + 1e-6 * (1 + want.abs())
            worst = max(worst, float(torch.nan_to_num((got.double() - want).abs() / tol, nan=float("inf")).max()))
        out["worst"] = worst if out["coefficient-independent"] else float("inf")
    out["pass"] = out["worst"] <= 1.0
    return out


def run_residual(device: torch.device, interpret: bool) -> list[dict]:
    from nora.kernels.triton import residual_triton

    shape, groups, (m, n) = RESIDUAL_SMALL
    cases = [
        (shape, groups, dt, act, form) for dt in (torch.float32, torch.bfloat16) for act in ACTIVATIONS for form in "AB"
    ]
    if not interpret:
        cases += RESIDUAL_LARGE
    results = []

    def record(res, label, t0):
        res.update(case=label, seconds=round(time.perf_counter() - t0, 2))
        results.append(res)
        extra = "  " + res["error"] if "error" in res else ""
        print(
            f"{'ok  ' if res['pass'] else 'FAIL'} {label}: worst error/bound {res['worst']:.3g} "
            f"({res['seconds']} s){extra}",
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for i, (shape, groups, dtype, act, form) in enumerate(cases):
        label = f"residual {act} {shape} G={groups} (5,4) {str(dtype)[6:]} form {form}"
        t0 = time.perf_counter()
        try:
            x, go = _inputs(shape, dtype, 300 + i, device)
            a, b = _coefs(groups, 5, 4, 50 + i, device)
            da, db = _coefs(groups, 5, 4, 90 + i, device)
            rr = 2.0**-7 if (interpret and dtype == torch.bfloat16) else None
            res = check_residual_case(residual_triton, x, a, b, a - 0.1 * da, b - 0.1 * db, go, form, act, rr)
        except Exception as exc:
            res = {"pass": False, "error": f"{type(exc).__name__}: {exc}", "worst": float("inf")}
            traceback.print_exc()
        record(res, label, t0)
    # exactness at equal coefficients: edge values (zeros, up to 1e4) and normal ones, every activation and form
    ex_shape = (4, 96) if interpret else (64, 197, 24)
    for dtype in (torch.float32, torch.bfloat16):
        for act in ACTIVATIONS:
            for form in "AB":
                label = f"residual exact at equal coefficients {act} {ex_shape} {str(dtype)[6:]} form {form}"
                t0 = time.perf_counter()
                try:
                    xe, goe = _inputs(ex_shape, dtype, 400, device, edge=True)
                    xn, gon = _inputs(ex_shape, dtype, 401, device)
                    res = check_residual_exact(
                        residual_triton, torch.cat([xe, xn]), torch.cat([goe, gon]), form, act, 60, device
                    )
                except Exception as exc:
                    res = {"pass": False, "error": f"{type(exc).__name__}: {exc}", "worst": float("inf")}
                    traceback.print_exc()
                record(res, label, t0)
    if not interpret:  # the same at LLaMA-3-8B's shape (the kernels of RESIDUAL_LARGE's last case)
        label = f"residual exact at equal coefficients gelu {LLAMA[0]} bfloat16 form A"
        t0 = time.perf_counter()
        try:
            x, go = _inputs(LLAMA[0], torch.bfloat16, 402, device)
            res = check_residual_exact(residual_triton, x, go, "A", "gelu", 61, device)
            del x, go
        except Exception as exc:
            res = {"pass": False, "error": f"{type(exc).__name__}: {exc}", "worst": float("inf")}
            traceback.print_exc()
        record(res, label, t0)
    # determinism: y, grad_x and the coefficient gradients bit-identical over 3 runs
    shape = (300, 16) if interpret else (64, 197, 768)
    x, go = _inputs(shape, torch.float32, 8, device)
    a, b = _coefs(8, 5, 4, 4, device)
    fa, fb = _coefs(8, 5, 4, 5, device)
    runs = [_run_residual(residual_triton, x, a, b, fa, fb, go, "A", "gelu") for _ in range(3)]
    same = all(torch.equal(r, s) for run in runs[1:] for r, s in zip(run, runs[0]))
    results.append(
        {"case": f"residual determinism {shape} (3 runs, bit-identical y, grad_x, coefficient grads)", "pass": same}
    )
    print(f"{'ok  ' if same else 'FAIL'} residual determinism {shape}: bit-identical over 3 runs")
    return results


# ----------------------------------------------------------------------------- benchmark vs GELU
# PAU's published 5/4 form-A GELU fit (values only matter through timing)
GELU_A = [
    -0.0012423594497499122,
    0.5080497063245629,
    0.41586363182937475,
    0.13022718688035761,
    0.024355900098993424,
    0.00290283948155535,
]
GELU_B = [-0.06675015696494944, 0.17927646217001553, 0.03746682605496631, 1.6561610853276082e-10]
BENCH_SHAPES = ((64, 197, 768), (4, 2048, 14336))
SMOKE_SHAPES = ((2, 3, 32),)


def _timer(device: torch.device, fn, inner: int) -> float:
    """Seconds per call of ``fn`` (``inner`` calls, CUDA events on the GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _bench_config(device: torch.device, shape, groups: int, dtype, repeats: int, warmup: int) -> list[dict]:
    import statistics

    import torch.nn.functional as F

    from nora.kernels.triton import rational_triton, residual_triton

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    go = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    fa = torch.tensor([GELU_A] * groups, device=device)
    fb = torch.tensor([GELU_B] * groups, device=device)
    a = (fa + 1e-3 * torch.randn(fa.shape, generator=gen).to(device)).requires_grad_()
    b = (fb + 1e-3 * torch.randn(fb.shape, generator=gen).to(device)).requires_grad_()
    impls = {
        "gelu": (lambda: F.gelu(x), (x,)),
        "rational": (lambda: rational_triton(x, a, b, "A"), (x, a, b)),
        "residual": (lambda: residual_triton(x, a, b, fa, fb, "A", "gelu"), (x, a, b)),
    }
    calls = {}
    for name, (f, inputs) in impls.items():
        calls[(name, "fwd")] = f
        calls[(name, "fwd_bwd")] = lambda f=f, inputs=inputs: torch.autograd.grad(f(), inputs, go)
    inner = {}
    for key, fn in calls.items():  # a first call (builds the kernels), then a rough time for the inner count
        fn()
        t = _timer(device, fn, 1)
        inner[key] = max(1, min(50, math.ceil(2e-3 / max(t, 1e-6)))) if device.type == "cuda" else 1
    times = {key: [] for key in calls}
    keys = list(calls)
    for r in range(warmup + repeats):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:  # interleaved rounds, rotated order
            t = _timer(device, calls[key], inner[key])
            if r >= warmup:
                times[key].append(t)
    moved = {"fwd": 2 * x.numel() * x.element_size(), "fwd_bwd": 5 * x.numel() * x.element_size()}
    med = {key: statistics.median(v) for key, v in times.items()}
    rows = []
    for name in impls:
        row = {
            "shape": list(shape),
            "groups": groups,
            "dtype": str(dtype)[6:],
            "impl": name,
            "inner": inner[(name, "fwd_bwd")],
        }
        for phase in ("fwd", "fwd_bwd"):
            t = med[(name, phase)]
            row[f"{phase}_ms"] = round(t * 1e3, 4)
            row[f"{phase}_ratio_vs_gelu"] = round(t / med[("gelu", phase)], 3)
            row[f"{phase}_GBps"] = round(moved[phase] / t / 1e9, 1)
        rows.append(row)
        print(
            f"{'x'.join(map(str, shape))} G={groups:<6} {row['dtype']:<8} {name:<9} "
            f"fwd {row['fwd_ms']:8.3f} ms x{row['fwd_ratio_vs_gelu']:.2f} GELU | "
            f"fwd+bwd {row['fwd_bwd_ms']:8.3f} ms x{row['fwd_bwd_ratio_vs_gelu']:.2f} GELU "
            f"{row['fwd_bwd_GBps']:7.1f} GB/s",
            flush=True,
        )
    return rows


def bench(device: torch.device, shapes, dtype=torch.bfloat16, repeats: int = 20, warmup: int = 3) -> list[dict]:
    """Median fwd and fwd+bwd times of GELU, rational_triton and residual_triton (gelu) per shape, G = 8 and G = D."""
    rows = []
    for shape in shapes:
        for groups in (8, shape[-1]):
            rows += _bench_config(device, shape, groups, dtype, repeats, warmup)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def run(device: torch.device, interpret: bool) -> list[dict]:
    from nora.kernels.triton import rational_triton

    cases = [(s, g, d, dt, False) for (s, g, d) in SMALL for dt in DTYPES]
    cases += [((3, 96), 4, (5, 4), dt, True) for dt in DTYPES]
    if not interpret:
        cases += [(s, g, d, dt, False) for (s, g, d) in LARGE for dt in DTYPES]
        cases += [(LLAMA[0], LLAMA[1], LLAMA[2], torch.bfloat16, False)]
    results = []
    for i, (shape, groups, (m, n), dtype, edge) in enumerate(cases):
        for form in "AB":
            label = f"{'edge ' if edge else ''}{shape} G={groups} ({m},{n}) {str(dtype)[6:]} form {form}"
            t0 = time.perf_counter()
            try:
                x, go = _inputs(shape, dtype, 100 + i, device, edge)
                a, b = _coefs(groups, m, n, i, device)
                if edge:
                    b[0, :3] = 0.0
                    b[:, -1] = b[:, -1].sign() * b[:, -1].abs().clamp(min=0.5)
                    a[:, -1] = a[:, -1].clamp(-0.5, 0.5)
                rr = 2.0**-7 if (interpret and dtype == torch.bfloat16) else None
                res = check_case(rational_triton, x, a, b, go, form, rr)
            except Exception as exc:
                res = {"pass": False, "error": f"{type(exc).__name__}: {exc}", "worst": float("inf")}
                traceback.print_exc()
            res.update(case=label, seconds=round(time.perf_counter() - t0, 2))
            results.append(res)
            print(
                f"{'ok  ' if res['pass'] else 'FAIL'} {label}: worst error/bound {res['worst']:.3g} "
                f"({res['seconds']} s){'  ' + res['error'] if 'error' in res else ''}",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # determinism: coefficient gradients bit-identical over 3 runs
    shape = (3, 96) if interpret else (64, 197, 768)
    x, go = _inputs(shape, torch.float32, 7, device)
    a, b = _coefs(8 if shape[-1] % 8 == 0 else 4, 5, 4, 3, device)
    grads = []
    for _ in range(3):
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        rational_triton(x, aa, bb, "A").backward(go)
        grads.append((aa.grad, bb.grad))
    same = all(torch.equal(g[0], grads[0][0]) and torch.equal(g[1], grads[0][1]) for g in grads)
    results.append({"case": f"determinism {shape} (3 runs, bit-identical coefficient grads)", "pass": same})
    print(f"{'ok  ' if same else 'FAIL'} determinism {shape}: coefficient gradients bit-identical over 3 runs")
    results += run_residual(device, interpret)
    if interpret:  # the benchmark's code path on tiny shapes (its numbers mean nothing under the interpreter)
        try:
            bench(device, SMOKE_SHAPES, repeats=1, warmup=0)
            ok = True
        except Exception:
            traceback.print_exc()
            ok = False
        results.append({"case": f"benchmark smoke {SMOKE_SHAPES} (interpreter)", "pass": ok})
        print(f"{'ok  ' if ok else 'FAIL'} benchmark smoke {SMOKE_SHAPES} under the interpreter")
    return results


def _environment(device: torch.device) -> dict:
    from nora.kernels import triton as tk

    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "triton_block": tk.BLOCK_ELEMS,
        "triton_warps": tk.NUM_WARPS,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["correctness", "interpret", "bench"])
    ap.add_argument("--json", default=None, help="write the case results (bench: the timings) here")
    ap.add_argument("--repeats", type=int, default=20, help="bench: timed rounds")
    ap.add_argument("--warmup", type=int, default=3, help="bench: untimed rounds")
    ap.add_argument(
        "--shapes", default=None, help="bench: shapes such as 4x2048x14336,64x197x768 (default: both of those)"
    )
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except Exception as exc:
        log.error(f"triton is not importable ({exc}); nothing to check")
        return 1
    if args.mode == "interpret":
        if os.environ.get("TRITON_INTERPRET") != "1":
            log.error("interpret mode needs TRITON_INTERPRET=1 in the environment (set before triton loads)")
            return 2
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            log.error("no CUDA device; run the interpreter mode instead")
            return 2
        device = torch.device("cuda")
    t0 = time.perf_counter()
    if args.mode == "bench":
        shapes = (
            BENCH_SHAPES
            if not args.shapes
            else [tuple(int(v) for v in spec.split("x")) for spec in args.shapes.split(",")]
        )
        rows = bench(device, shapes, torch.bfloat16, args.repeats, args.warmup)
        summary = {
            "mode": "bench",
            **_environment(device),
            "seconds": round(time.perf_counter() - t0, 1),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "rows": rows,
        }
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
        print(f"benchmark done in {summary['seconds']} s")
        return 0
    results = run(device, interpret=args.mode == "interpret")
    failed = [r["case"] for r in results if not r["pass"]]
    summary = {
        "mode": args.mode,
        **_environment(device),
        "seconds": round(time.perf_counter() - t0, 1),
        "cases": len(results),
        "failed": failed,
        "results": results,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(results) - len(failed)}/{len(results)} checks passed in {summary['seconds']} s")
    return 0 if not failed else 1


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
