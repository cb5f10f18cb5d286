"""Correctness checks of the Triton rational kernels against the float64 reference (helper of
``scripts/gpu_check.sh``; self-contained: needs torch and triton only, no pytest).

    python scripts/gpu_check.py correctness [--json PATH]     # CUDA: small and large shapes
    TRITON_INTERPRET=1 python scripts/gpu_check.py interpret  # CPU interpreter, small shapes

Every case runs forward and backward through ``nora.kernels.triton.rational_triton`` and compares
with ``rational_reference`` evaluated in float64 on copies of the same (rounded) inputs,
differentiated by autograd. Bounds (as in tests/test_kernels.py): outputs and grad_x within
``ROUND*(|ref| + 1e-5*scale) + 1e-5*scale`` (scale: the float64 condition scale of the quantity;
ROUND: half an ulp of the output dtype, a whole bfloat16 ulp under the interpreter, which truncates);
coefficient gradients within ``2e-5 * sum|terms|``. Each case reports its worst error/bound ratio
(<= 1 passes). Also checks bit-identical coefficient gradients over 3 runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nora.rational.functional import rational_reference  # noqa: E402

RTOL, COEF_RTOL = 1e-5, 2e-5
ROUND = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
FLOOR = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0 ** -25}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

SMALL = [((3, 5, 24), 4, (5, 4)), ((7, 40), 1, (5, 4)), ((2, 3, 6), 6, (5, 4)),
         ((5, 300), 3, (3, 2)), ((4, 20), 2, (7, 7)), ((3, 17), 1, (0, 1))]
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
        scale_gx = (gog * (abs_dp / q + abs_dr * abs_p / q ** 2) * cond).reshape(x.shape)
        s_num = torch.stack([(gog * ax ** i / q).sum(dim=(0, 2)) for i in range(m1)], 1)
        den_terms = [gog * ax ** j * abs_p / q ** 2 for j in range(1, n + 1)]
        s_den = torch.stack([t.sum(dim=(0, 2)) for t in den_terms], 1)
        kink_den = torch.stack([(2 * t * kink).sum(dim=(0, 2)) for t in den_terms], 1)
        rnd = ROUND[x.dtype] if round_rel is None else round_rel
        out = {}
        for name, got, ref, scale, mask in (("y", y, y_ref, scale_y, None),
                                            ("grad_x", xx.grad, x64.grad, scale_gx, kink.reshape(x.shape))):
            err = (got.double() - ref).abs()
            tol = rnd * (ref.abs() + RTOL * scale) + RTOL * scale + FLOOR[x.dtype] + 1e-300
            ratio = err / tol
            if mask is not None:
                ratio = ratio.masked_fill(mask, 0.0)
            ratio = torch.nan_to_num(ratio, nan=float("inf"))
            finite_ok = bool((torch.isfinite(got) == torch.isfinite(ref)).all())
            out[name] = float(ratio.max()) if finite_ok else float("inf")
        for name, got, ref, s, extra in (("grad_numerator", aa.grad, a64.grad, s_num, 0.0),
                                         ("grad_denominator", bb.grad, b64.grad, s_den, kink_den)):
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
                rr = 2.0 ** -7 if (interpret and dtype == torch.bfloat16) else None
                res = check_case(rational_triton, x, a, b, go, form, rr)
            except Exception as exc:
                res = {"pass": False, "error": f"{type(exc).__name__}: {exc}", "worst": float("inf")}
                traceback.print_exc()
            res.update(case=label, seconds=round(time.perf_counter() - t0, 2))
            results.append(res)
            print(f"{'ok  ' if res['pass'] else 'FAIL'} {label}: worst error/bound {res['worst']:.3g} "
                  f"({res['seconds']} s){'  ' + res['error'] if 'error' in res else ''}", flush=True)
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
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["correctness", "interpret"])
    ap.add_argument("--json", default=None, help="write the case results here")
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except Exception as exc:
        print(f"triton is not importable ({exc}); nothing to check")
        return 1
    if args.mode == "interpret":
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("interpret mode needs TRITON_INTERPRET=1 in the environment (set before triton loads)")
            return 2
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; run the interpreter mode instead")
            return 2
        device = torch.device("cuda")
    t0 = time.perf_counter()
    results = run(device, interpret=args.mode == "interpret")
    failed = [r["case"] for r in results if not r["pass"]]
    summary = {"mode": args.mode, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "triton": __import__("triton").__version__,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "seconds": round(time.perf_counter() - t0, 1), "cases": len(results), "failed": failed,
               "results": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(results) - len(failed)}/{len(results)} checks passed in {summary['seconds']} s")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
