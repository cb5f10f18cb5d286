"""Kernel benchmark: rational-activation implementations against GELU and SiLU, in one process.

``python -m nora.bench kernels [--device cpu|cuda] [--shapes 64x197x768:8,...] [--dtype float32]
[--repeats 7] [--warmup 2] [--form A] [--residual-activation auto] [--impls gelu,silu,...] [--no-compile]
[--out PATH]``

For every shape, every implementation is timed for the forward (autograd-recording, inputs that
require grad) and for forward+backward (``torch.autograd.grad`` of the output w.r.t. x and, for the
rationals, both coefficient tensors). Rounds are interleaved (each round times every implementation
once, in a rotated order), after ``--warmup`` untimed rounds; medians are reported with the ratio to
GELU's median from the same run. Implementations slower than 0.5 s per forward+backward (the
plain-autograd baselines) are timed in only the first ``--slow-repeats`` rounds. Also recorded per implementation:

* saved-for-backward bytes per input element (``torch.autograd.graph.saved_tensors_hooks``; each
  distinct storage counted once, the input's own storage included, so GELU's is 1x the input);
* the memory-bandwidth floor: the least bytes any implementation must move (forward: read x, write
  y; backward: read x and grad_y, write grad_x; coefficient traffic is negligible) divided by the
  copy bandwidth measured in the same run (``dst.copy_(src)`` on a large tensor), the achieved GB/s
  and the fraction of the copy bandwidth.

Implementations: ``gelu``, ``silu`` (torch), ``reference`` (plain autograd over the Horner math),
``stacked_powers`` (plain autograd over a stacked tensor of powers, as the public PyTorch fallbacks
of rational activations do), ``compile`` (``torch.compile`` of the reference math; its compile time
is recorded), ``torch`` (custom autograd Function, analytic gradients), ``cpu`` (fused C++
extension) and ``triton`` (CUDA) when available, all in the paper's form (the plain rational P/Q), and
``cpu_residual`` / ``triton_residual``: the fused backend's residual form ``phi(x) + (R(x) - R_fit(x))``
(:func:`nora.kernels.residual_rational`), with ``phi`` the shape's own activation (``--residual-activation auto``:
GELU at 64x197x768, the ViT shape, SiLU at the LLaMA shapes with D = 14336, GELU elsewhere) and trained coefficients
that differ from the fit (so nothing cancels early). The sweep over the number of groups times both forms.

Output: a table on stdout and JSON at ``results/bench_kernels_<device>.json`` (with hardware info).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from nora.files import write_json_atomic
from nora.hardware import describe
from nora.kernels import available_backends, resolve_backend
from nora.logs import setup_logging
from nora.rational.functional import KERNEL_ACTIVATIONS, rational_reference, residual_reference

log = logging.getLogger(__name__)

# PAU's published 5/4 form-A GELU fit (values only matter through timing; kept fixed for repeatability)
GELU_A = [
    -0.0012423594497499122,
    0.5080497063245629,
    0.41586363182937475,
    0.13022718688035761,
    0.024355900098993424,
    0.00290283948155535,
]
GELU_B = [-0.06675015696494944, 0.17927646217001553, 0.03746682605496631, 1.6561610853276082e-10]

CPU_SHAPES = "64x197x768:8,2x512x14336:8"
CUDA_SHAPES = "64x197x768:8,2x512x14336:8,4x2048x14336:8:bfloat16"
# the sweep over the number of groups, from one rational for all channels to one per channel (G = D): GELU and
# the fused backend only, interleaved, per G
CPU_GROUP_SWEEP = "64x197x768:1/8/96/768,2x512x14336:1/8/14336"
CUDA_GROUP_SWEEP = "64x197x768:1/8/96/768,2x512x14336:1/8/14336,4x2048x14336:1/8/14336:bfloat16"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# the residual form's phi per shape (--residual-activation auto): the activation the shape's model uses
RESIDUAL_ACTIVATIONS = {(64, 197, 768): "gelu", (2, 512, 14336): "silu", (4, 2048, 14336): "silu"}
TARGETS = {
    "cpu_fwd_bwd_max_ratio_vs_gelu": 1.25,  # fused CPU backend, both forms, ViT and LLaMA shapes, every G of the sweep
    "saved_bytes_equal_to_gelu": True,
    "gpu_fwd_bwd_min_bandwidth_fraction": 0.60,  # Triton at the LLaMA shape
}
ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- implementations
def stacked_powers(
    x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, form: str = "A"
) -> torch.Tensor:
    """Plain autograd over a stacked tensor of powers (the public PyTorch fallback pattern)."""
    g = numerator.shape[0]
    xg = x.reshape(-1, g, x.shape[-1] // g).float()
    m1, n = numerator.shape[1], denominator.shape[1]
    pw = [torch.ones_like(xg), xg]
    for _ in range(max(m1, n + 1) - 2):
        pw.append(pw[-1] * xg)
    xps = torch.stack(pw, dim=-1)  # (N, G, C, K)
    p = (xps[..., :m1] * numerator[:, None, :]).sum(-1)
    if form == "A":
        q = 1.0 + (xps[..., 1 : n + 1] * denominator[:, None, :]).abs().sum(-1)
    else:
        q = 1.0 + (xps[..., 1 : n + 1] * denominator[:, None, :]).sum(-1).abs()
    return (p / q).to(x.dtype).reshape(x.shape)


class Impl:
    """``fn(x, a, b, form)``; a residual-form implementation (``residual``) is
    ``fn(x, a, b, fit_a, fit_b, form, activation)``."""

    def __init__(self, name: str, fn: Callable, rational: bool, note: str = "", residual: bool = False):
        self.name, self.fn, self.rational, self.note, self.residual = name, fn, rational, note, residual
        self.error: str | None = None
        self.compile_s: float | None = None


def build_impls(device: torch.device, names: list[str] | None, use_compile: bool) -> list[Impl]:
    impls = [
        Impl("gelu", lambda x, a, b, f: F.gelu(x), False, "torch.nn.functional.gelu"),
        Impl("silu", lambda x, a, b, f: F.silu(x), False, "torch.nn.functional.silu"),
        Impl("reference", rational_reference, True, "plain autograd, Horner"),
        Impl("stacked_powers", stacked_powers, True, "plain autograd, stacked powers"),
    ]
    if use_compile and (not names or "compile" in names):
        impls.append(
            Impl(
                "compile", torch.compile(rational_reference, dynamic=False), True, "torch.compile of the reference math"
            )
        )
    avail = available_backends(device.type)
    for name, note in (
        ("torch", "autograd.Function, analytic grads, saves x"),
        ("cpu", "fused C++ extension"),
        ("triton", "Triton kernels"),
    ):
        if name in avail:
            impls.append(Impl(name, resolve_backend(name, device).fn, True, note))
    fused = "triton" if device.type == "cuda" else "cpu"
    if fused in avail and resolve_backend(fused, device).residual is not None:
        impls.append(residual_impl(device))
    if names:
        unknown = set(names) - {i.name for i in impls} - {"compile", "cpu", "triton", "cpu_residual", "triton_residual"}
        if unknown:
            raise SystemExit(f"unknown implementation(s) {sorted(unknown)}")
        impls = [i for i in impls if i.name in names]
    return impls


def residual_impl(device: torch.device) -> Impl:
    """The fused backend's residual form (``<backend>_residual``)."""
    fused = "triton" if device.type == "cuda" else "cpu"
    return Impl(
        f"{fused}_residual",
        resolve_backend(fused, device).residual,
        True,
        f"{fused} backend, residual form phi(x) + (R(x) - R_fit(x))",
        residual=True,
    )


def residual_activation(shape: tuple[int, ...], choice: str) -> str:
    """phi of the residual form at ``shape``: ``choice``, or with ``auto`` the shape's model's activation."""
    if choice != "auto":
        return choice
    return RESIDUAL_ACTIVATIONS.get(tuple(shape), "gelu")


# ----------------------------------------------------------------------------- measurement helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / inner


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 7) -> dict:
    """GB/s of dst.copy_(src) (2 * nbytes moved; no allocation) and of src.clone() (with allocation)."""
    n = max(1, nbytes // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    inner = 1 if device.type == "cpu" else 10
    for _ in range(2):
        dst.copy_(src)
        src.clone()
    t_copy = statistics.median(_timed(lambda: dst.copy_(src), device, inner) for _ in range(repeats))
    t_clone = statistics.median(_timed(lambda: src.clone(), device, inner) for _ in range(repeats))
    moved = 2 * n * 4
    return {
        "bytes": moved,
        "copy_GBps": moved / t_copy / 1e9,
        "clone_GBps": moved / t_clone / 1e9,
        "copy_ms": t_copy * 1e3,
        "clone_ms": t_clone * 1e3,
    }


def saved_bytes(make_output: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while make_output runs."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except Exception:  # tensors without storage (e.g. wrapper subclasses)
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = make_output()
    del y
    return sum(seen.values())


def hardware_info(device: torch.device) -> dict:
    try:
        info = describe()
    except Exception:
        info = {}
    cpu = info.get("cpu")
    if not cpu:
        cpu = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    info.update(
        {
            "cpu": cpu,
            "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        }
    )
    try:
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            {
                "gpu": p.name,
                "gpu_memory_GiB": round(p.total_memory / 2**30, 1),
                "gpu_capability": f"{p.major}.{p.minor}",
                "cuda": torch.version.cuda,
            }
        )
    try:
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except Exception:
        info["git_commit"] = None
    return info


def parse_shapes(spec: str, default_dtype: torch.dtype) -> list[tuple[tuple[int, ...], int, torch.dtype]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        shape = tuple(int(v) for v in parts[0].lower().split("x"))
        groups = int(parts[1]) if len(parts) > 1 and parts[1] else 8
        dtype = DTYPES[parts[2]] if len(parts) > 2 else default_dtype
        if shape[-1] % groups:
            raise SystemExit(f"shape {shape}: last dimension not divisible by {groups} groups")
        out.append((shape, groups, dtype))
    return out


# ----------------------------------------------------------------------------- one shape
class ShapeCase:
    """The tensors of one benchmarked shape and the timed closures over them. The residual form's fit is the
    plain rows' coefficients, its trained coefficients those times (1 + 2^-7) (different bits: no early cancel)."""

    def __init__(self, shape, groups, dtype, device, form, activation="gelu"):
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.x0 = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        self.go = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        self.a0 = torch.tensor(GELU_A, device=device).repeat(groups, 1)
        self.b0 = torch.tensor(GELU_B, device=device).repeat(groups, 1)
        self.x, self.a, self.b = (t.clone().requires_grad_() for t in (self.x0, self.a0, self.b0))
        self.fit_a, self.fit_b = self.a0.clone(), self.b0.clone()
        self.ra, self.rb = ((t * (1 + 2.0**-7)).requires_grad_() for t in (self.a0, self.b0))
        self.form, self.device, self.activation = form, device, activation
        self.y_ref = rational_reference(self.x0, self.a0, self.b0, form).float()
        self._y_res_ref = None

    def y_res_ref(self) -> torch.Tensor:
        if self._y_res_ref is None:
            self._y_res_ref = residual_reference(
                self.x0, self.ra.detach(), self.rb.detach(), self.fit_a, self.fit_b, self.form, self.activation
            ).float()
        return self._y_res_ref

    def call(self, impl: Impl, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if impl.residual:
            return impl.fn(x, a, b, self.fit_a, self.fit_b, self.form, self.activation)
        return impl.fn(x, a, b, self.form)

    def fwd(self, impl: Impl):
        a, b = (self.ra, self.rb) if impl.residual else (self.a, self.b)
        return lambda: self.call(impl, self.x, a, b)

    def fwd_bwd(self, impl: Impl):
        a, b = (self.ra, self.rb) if impl.residual else (self.a, self.b)
        inputs = (self.x, a, b) if impl.rational else (self.x,)

        def run():
            y = self.call(impl, self.x, a, b)
            torch.autograd.grad(y, inputs, self.go)

        return run


def _first_call(impl: Impl, case: ShapeCase, row: dict) -> None:
    """First calls (torch.compile, JIT build), the correctness sanity check and the saved bytes, into ``row``."""
    t0 = time.perf_counter()
    case.fwd_bwd(impl)()
    _sync(case.device)
    first = time.perf_counter() - t0
    if impl.name == "compile":
        row["compile_and_first_call_s"] = round(first, 2)
        t0 = time.perf_counter()
        case.fwd_bwd(impl)()
        _sync(case.device)
        first = time.perf_counter() - t0
    row["first_fwd_bwd_s"] = round(first, 4)
    with torch.no_grad():
        if impl.residual:
            y = case.call(impl, case.x0, case.ra.detach(), case.rb.detach()).float()
            ref = case.y_res_ref()
            row["activation"] = case.activation
        else:
            y = impl.fn(case.x0, case.a0, case.b0, case.form).float()
            ref = case.y_ref
    if impl.rational:
        row["max_abs_diff_vs_reference"] = float((y - ref).abs().max())
        row["max_abs_reference"] = float(ref.abs().max())
    del y
    row["saved_bytes"] = saved_bytes(case.fwd(impl))
    row["saved_bytes_per_element"] = row["saved_bytes"] / case.x0.numel()


def _inner_iterations(impl: Impl, case: ShapeCase) -> int:
    """Inner iterations so one sample is >= ~5 ms on accelerators (1 on the CPU)."""
    if case.device.type == "cpu":
        return 1
    t = _timed(case.fwd_bwd(impl), case.device, 1)
    return max(1, min(200, int(math.ceil(5e-3 / max(t, 1e-6)))))


def _timed_rounds(
    runnable: list[Impl],
    case: ShapeCase,
    rows: dict,
    inner: dict,
    repeats: int,
    warmup: int,
    slow: set[str],
    slow_repeats: int,
) -> None:
    """Interleaved rounds (rotating start); the slow implementations take part in the first few only."""
    for r in range(warmup + repeats):
        order = runnable[r % len(runnable) :] + runnable[: r % len(runnable)] if runnable else []
        for impl in order:
            if impl.name in slow and (r >= warmup + slow_repeats or r < warmup - 1):
                continue  # one warm-up round is enough for them
            tf = _timed(case.fwd(impl), case.device, inner[impl.name])
            tb = _timed(case.fwd_bwd(impl), case.device, inner[impl.name])
            if r >= warmup:
                rows[impl.name]["fwd_ms_all"].append(tf * 1e3)
                rows[impl.name]["fwd_bwd_ms_all"].append(tb * 1e3)
        gc.collect()


def _summarise(rows: dict, inner: dict, moved_fwd: int, moved_fb: int, floor_fwd: float, floor_fb: float) -> None:
    """Medians, ratios to GELU, achieved GB/s and fractions of the copy bandwidth, per row."""
    gelu = rows.get("gelu", {})
    g_f = statistics.median(gelu["fwd_ms_all"]) if gelu.get("fwd_ms_all") else None
    g_fb = statistics.median(gelu["fwd_bwd_ms_all"]) if gelu.get("fwd_bwd_ms_all") else None
    g_saved = gelu.get("saved_bytes")
    for row in rows.values():
        if not row["fwd_ms_all"]:
            continue
        row["fwd_ms"] = statistics.median(row["fwd_ms_all"])
        row["fwd_bwd_ms"] = statistics.median(row["fwd_bwd_ms_all"])
        row["fwd_ratio_vs_gelu"] = row["fwd_ms"] / g_f if g_f else None
        row["fwd_bwd_ratio_vs_gelu"] = row["fwd_bwd_ms"] / g_fb if g_fb else None
        row["saved_ratio_vs_gelu"] = row["saved_bytes"] / g_saved if g_saved else None
        row["fwd_GBps"] = moved_fwd / (row["fwd_ms"] * 1e-3) / 1e9
        row["fwd_bwd_GBps"] = moved_fb / (row["fwd_bwd_ms"] * 1e-3) / 1e9
        row["fwd_bandwidth_fraction"] = floor_fwd / row["fwd_ms"]
        row["fwd_bwd_bandwidth_fraction"] = floor_fb / row["fwd_bwd_ms"]
        row["inner_iterations"] = inner.get(row["impl"], 1)
        row["timed_rounds"] = len(row["fwd_ms_all"])


def bench_shape(
    impls: list[Impl],
    shape,
    groups,
    dtype,
    device,
    form,
    repeats,
    warmup,
    copy_bw,
    slow_repeats=3,
    slow_s=0.5,
    log=print,
    activation="gelu",
) -> dict:
    case = ShapeCase(shape, groups, dtype, device, form, activation)
    rows: dict[str, dict] = {}
    runnable = []
    for impl in impls:
        row = rows.setdefault(impl.name, {"impl": impl.name, "note": impl.note, "fwd_ms_all": [], "fwd_bwd_ms_all": []})
        try:
            _first_call(impl, case, row)
            runnable.append(impl)
        except Exception as exc:  # an implementation that fails is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            log(f"  {impl.name}: skipped ({row['error']})")
        gc.collect()
    inner = {impl.name: _inner_iterations(impl, case) for impl in runnable}
    # implementations slower than slow_s per fwd+bwd (the plain-autograd baselines) take part in
    # only the first slow_repeats timed rounds (still interleaved with the others)
    slow = {i.name for i in runnable if rows[i.name].get("first_fwd_bwd_s", 0) > slow_s}
    _timed_rounds(runnable, case, rows, inner, repeats, warmup, slow, slow_repeats)
    n, es = case.x0.numel(), case.x0.element_size()
    moved_fwd, moved_fb = 2 * es * n, 5 * es * n
    floor_fwd = moved_fwd / (copy_bw * 1e9) * 1e3
    floor_fb = moved_fb / (copy_bw * 1e9) * 1e3
    _summarise(rows, inner, moved_fwd, moved_fb, floor_fwd, floor_fb)
    return {
        "shape": list(shape),
        "groups": groups,
        "dtype": str(dtype).replace("torch.", ""),
        "elements": n,
        "form": form,
        "residual_activation": activation,
        "min_bytes_moved_fwd": moved_fwd,
        "min_bytes_moved_fwd_bwd": moved_fb,
        "floor_fwd_ms": floor_fwd,
        "floor_fwd_bwd_ms": floor_fb,
        "rows": list(rows.values()),
    }


def format_table(res: dict) -> str:
    head = (
        f"shape {tuple(res['shape'])} G={res['groups']} {res['dtype']} form {res['form']} (residual form: phi = "
        f"{res.get('residual_activation', 'gelu')}): floor fwd {res['floor_fwd_ms']:.2f} ms, fwd+bwd "
        f"{res['floor_fwd_bwd_ms']:.2f} ms"
    )
    cols = ["impl", "fwd ms", "xGELU", "fwd+bwd ms", "xGELU", "saved B/elem", "xGELU", "GB/s", "of copy bw"]
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in res["rows"]:
        if "fwd_ms" not in r:
            lines.append(f"| {r['impl']} | failed: {r.get('error', '?')[:80]} |")
            continue
        lines.append(
            "| "
            + " | ".join(
                [
                    r["impl"],
                    f(r["fwd_ms"], ".2f"),
                    f(r["fwd_ratio_vs_gelu"], ".2f"),
                    f(r["fwd_bwd_ms"], ".2f"),
                    f(r["fwd_bwd_ratio_vs_gelu"], ".2f"),
                    f(r["saved_bytes_per_element"], ".2f"),
                    f(r["saved_ratio_vs_gelu"], ".2f"),
                    f(r["fwd_bwd_GBps"], ".1f"),
                    f(r["fwd_bwd_bandwidth_fraction"] * 100, ".0f") + "%",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def evaluate_targets(results: list[dict], device: torch.device) -> dict:
    out = {}
    for res in results:
        rows = {r["impl"]: r for r in res["rows"] if "fwd_ms" in r}
        key = "x".join(map(str, res["shape"])) + f":{res['dtype']}"
        if device.type == "cpu" and tuple(res["shape"]) == (64, 197, 768) and "cpu" in rows:
            r = rows["cpu"]
            out[f"cpu_fwd_bwd_ratio_vs_gelu@{key}"] = {
                "value": r["fwd_bwd_ratio_vs_gelu"],
                "target_max": TARGETS["cpu_fwd_bwd_max_ratio_vs_gelu"],
                "met": r["fwd_bwd_ratio_vs_gelu"] <= TARGETS["cpu_fwd_bwd_max_ratio_vs_gelu"],
            }
        if device.type == "cpu" and "cpu_residual" in rows:  # the residual form at every CPU shape
            r = rows["cpu_residual"]
            out[f"cpu_residual_fwd_bwd_ratio_vs_gelu@{key}"] = {
                "value": r["fwd_bwd_ratio_vs_gelu"],
                "target_max": TARGETS["cpu_fwd_bwd_max_ratio_vs_gelu"],
                "activation": res.get("residual_activation"),
                "met": r["fwd_bwd_ratio_vs_gelu"] <= TARGETS["cpu_fwd_bwd_max_ratio_vs_gelu"],
            }
        fused = "triton" if device.type == "cuda" else "cpu"
        for name, sets in ((fused, 1), (f"{fused}_residual", 2)):  # the residual form saves the fit's too
            if name in rows and "gelu" in rows:
                extra = rows[name]["saved_bytes"] - rows["gelu"]["saved_bytes"]
                out[f"{name}_saved_bytes_minus_gelu@{key}"] = {
                    "value": extra,
                    "note": f"coefficient tensors only ({sets} x G x (m+1+n) floats)",
                    "met": 0 <= extra <= sets * 4 * res["groups"] * 16,
                }
        if device.type == "cuda" and res["shape"][-1] == 14336 and "triton" in rows:
            frac = rows["triton"]["fwd_bwd_bandwidth_fraction"]
            out[f"triton_fwd_bwd_bandwidth_fraction@{key}"] = {
                "value": frac,
                "target_min": TARGETS["gpu_fwd_bwd_min_bandwidth_fraction"],
                "met": frac >= TARGETS["gpu_fwd_bwd_min_bandwidth_fraction"],
            }
    return out


def parse_group_sweep(spec: str, default_dtype: torch.dtype) -> list[tuple[tuple[int, ...], list[int], torch.dtype]]:
    """``BxTxD:G1/G2/...[:dtype],...`` -> [(shape, [G...], dtype)]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        shape = tuple(int(v) for v in parts[0].lower().split("x"))
        groups = [int(g) for g in parts[1].split("/")] if len(parts) > 1 and parts[1] else [1, 8, shape[-1]]
        bad = [g for g in groups if shape[-1] % g]
        if bad:
            raise SystemExit(f"group sweep {item}: last dimension not divisible by {bad}")
        out.append((shape, groups, DTYPES[parts[2]] if len(parts) > 2 else default_dtype))
    return out


def _sweep_cell(r: dict, ref: dict) -> dict:
    if "fwd_ms" not in r:
        return {"error": r.get("error")}
    return {
        "fwd_bwd_ratio_vs_gelu": r["fwd_bwd_ratio_vs_gelu"],
        "fwd_ratio_vs_gelu": r["fwd_ratio_vs_gelu"],
        "fwd_bwd_ms": r["fwd_bwd_ms"],
        "fwd_ms": r["fwd_ms"],
        "gelu_fwd_bwd_ms": ref["fwd_bwd_ms"],
        "gelu_fwd_ms": ref["fwd_ms"],
        "fwd_bwd_ms_all": r["fwd_bwd_ms_all"],
        "gelu_fwd_bwd_ms_all": ref["fwd_bwd_ms_all"],
        "timed_rounds": r["timed_rounds"],
    }


def run_group_sweep(sweep, device, form, repeats, warmup, copy_bw, log=print, residual_choice="auto") -> list[dict]:
    """fwd and fwd+bwd of the fused backend against GELU for every G of every sweep shape (same run, interleaved),
    in both forms: the plain rational (``by_groups[G]``'s own fields) and the residual form (``by_groups[G]
    ["residual"]``, phi as in the main table), all three timed in the same rounds."""
    fused = "triton" if device.type == "cuda" else "cpu"
    impls = [i for i in build_impls(device, ["gelu", fused, f"{fused}_residual"], use_compile=False)]
    if fused not in {i.name for i in impls}:
        log(f"group sweep skipped: the {fused!r} backend is not available here")
        return []
    out = []
    for shape, groups, dtype in sweep:
        act = residual_activation(shape, residual_choice)
        entry = {
            "shape": list(shape),
            "dtype": str(dtype).replace("torch.", ""),
            "impl": fused,
            "form": form,
            "residual_impl": f"{fused}_residual",
            "residual_activation": act,
            "by_groups": {},
        }
        for g in groups:
            res = bench_shape(impls, shape, g, dtype, device, form, repeats, warmup, copy_bw, log=log, activation=act)
            rows = {r["impl"]: r for r in res["rows"]}
            r, ref = rows[fused], rows["gelu"]
            cell = entry["by_groups"][str(g)] = _sweep_cell(r, ref)
            if f"{fused}_residual" in rows:
                cell["residual"] = _sweep_cell(rows[f"{fused}_residual"], ref)
            if "error" in cell:
                continue
            rr = cell.get("residual", {})
            log(
                f"  {tuple(shape)} {entry['dtype']} G={g}: {fused} fwd+bwd {r['fwd_bwd_ms']:.2f} ms = "
                f"{r['fwd_bwd_ratio_vs_gelu']:.2f}x GELU ({ref['fwd_bwd_ms']:.2f} ms); fwd "
                f"{r['fwd_ratio_vs_gelu']:.2f}x"
                + (
                    f"; residual ({act}) fwd+bwd {rr['fwd_bwd_ratio_vs_gelu']:.2f}x, fwd {rr['fwd_ratio_vs_gelu']:.2f}x"
                    if "fwd_bwd_ratio_vs_gelu" in rr
                    else ""
                )
            )
        out.append(entry)
    return out


def group_sweep_targets(sweep: list[dict], device: torch.device) -> dict:
    if device.type != "cpu":
        return {}
    out = {}
    for entry in sweep:
        key = "x".join(map(str, entry["shape"])) + f":{entry['dtype']}"
        for g, r in entry["by_groups"].items():
            for name, cell in (("cpu", r), ("cpu_residual", r.get("residual", {}))):
                if "fwd_bwd_ratio_vs_gelu" in cell:
                    v = cell["fwd_bwd_ratio_vs_gelu"]
                    out[f"{name}_fwd_bwd_ratio_vs_gelu@{key}:G={g}"] = {
                        "value": v,
                        "target_max": TARGETS["cpu_fwd_bwd_max_ratio_vs_gelu"],
                        "met": v <= TARGETS["cpu_fwd_bwd_max_ratio_vs_gelu"],
                    }
    return out


def forms_summary(results: list[dict], sweep: list[dict]) -> list[dict]:
    """Every form at every shape and G, as ratios to GELU from the same run: the main table's rows of the fused
    backend (both forms) and the group sweep's."""
    out = []
    for res in results:
        rows = {r["impl"]: r for r in res["rows"] if "fwd_ms" in r}
        for impl in ("cpu", "triton", "cpu_residual", "triton_residual"):
            if impl in rows:
                out.append(
                    {
                        "source": "shapes",
                        "shape": res["shape"],
                        "dtype": res["dtype"],
                        "groups": res["groups"],
                        "form": "residual" if impl.endswith("_residual") else "plain",
                        "activation": res.get("residual_activation") if impl.endswith("_residual") else None,
                        "impl": impl,
                        "fwd_bwd_ratio_vs_gelu": rows[impl]["fwd_bwd_ratio_vs_gelu"],
                        "fwd_ratio_vs_gelu": rows[impl]["fwd_ratio_vs_gelu"],
                    }
                )
    for entry in sweep:
        for g, cell in entry["by_groups"].items():
            for form, c in (("plain", cell), ("residual", cell.get("residual", {}))):
                if "fwd_bwd_ratio_vs_gelu" in c:
                    out.append(
                        {
                            "source": "groups_sweep",
                            "shape": entry["shape"],
                            "dtype": entry["dtype"],
                            "groups": int(g),
                            "form": form,
                            "activation": entry.get("residual_activation") if form == "residual" else None,
                            "impl": entry["impl"] + ("_residual" if form == "residual" else ""),
                            "fwd_bwd_ratio_vs_gelu": c["fwd_bwd_ratio_vs_gelu"],
                            "fwd_ratio_vs_gelu": c["fwd_ratio_vs_gelu"],
                        }
                    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nora.bench kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    ap.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated BxTxD[:G[:dtype]] (default cpu: {CPU_SHAPES}; cuda: {CUDA_SHAPES})",
    )
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of shapes without one")
    ap.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument(
        "--slow-repeats",
        type=int,
        default=3,
        help="timed rounds for implementations slower than 0.5 s per fwd+bwd (plain autograd)",
    )
    ap.add_argument("--form", default="A", choices=["A", "B"])
    ap.add_argument(
        "--residual-activation",
        default="auto",
        choices=["auto", *KERNEL_ACTIVATIONS],
        help="phi of the residual-form rows (auto: gelu at 64x197x768, silu at the D = 14336 shapes, gelu elsewhere)",
    )
    ap.add_argument("--impls", default=None, help="comma-separated subset of implementations")
    ap.add_argument(
        "--groups-sweep",
        default=None,
        help=f"BxTxD:G1/G2/...[:dtype],... timed for GELU and the fused backend only (default cpu: "
        f"{CPU_GROUP_SWEEP}; cuda: {CUDA_GROUP_SWEEP}; '' skips it)",
    )
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    ap.add_argument(
        "--bandwidth-mb",
        type=float,
        default=None,
        help="size of the copy-bandwidth tensor (default: the largest input, at least 256 MB)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before timing")
    ap.add_argument("--out", default=None, help="JSON path (default results/bench_kernels_<device>.json)")
    args = ap.parse_args(argv)

    dev_name = args.device
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.error("no CUDA device available")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = parse_shapes(args.shapes or (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES), DTYPES[args.dtype])
    names = args.impls.split(",") if args.impls else None
    impls = build_impls(device, names, use_compile=not args.no_compile)
    out_path = Path(args.out) if args.out else ROOT / "results" / f"bench_kernels_{device.type}.json"

    hw = hardware_info(device)
    log.info(
        f"nora kernel benchmark on {device.type}: {hw.get('gpu') or hw['cpu']} "
        f"({hw['torch_threads']} threads), torch {hw['torch']}; implementations: "
        f"{', '.join(i.name for i in impls)}",
    )
    largest = max(math.prod(s) * 4 for s, _, _ in shapes)
    bw_bytes = int(args.bandwidth_mb * 2**20) if args.bandwidth_mb else max(largest, 256 * 2**20)
    bw_runs = [copy_bandwidth(device, bw_bytes)]
    log.info(
        f"copy bandwidth: {bw_runs[0]['copy_GBps']:.1f} GB/s (copy_), "
        f"{bw_runs[0]['clone_GBps']:.1f} GB/s (clone, with allocation)",
    )
    results: list[dict] = []
    sweep_results: list[dict] = []
    sweep_spec = (
        args.groups_sweep
        if args.groups_sweep is not None
        else (CUDA_GROUP_SWEEP if device.type == "cuda" else CPU_GROUP_SWEEP)
    )
    sweep = parse_group_sweep(sweep_spec, DTYPES[args.dtype])
    t_start = time.perf_counter()
    command = "python -m nora.bench kernels " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(final: bool) -> dict:
        """Write the JSON (after every shape too, so an interrupted run keeps what it measured)."""
        bw = statistics.median(r["copy_GBps"] for r in bw_runs)
        for res in results:  # floors from the median over every bandwidth measurement so far
            res["floor_fwd_ms"] = res["min_bytes_moved_fwd"] / (bw * 1e9) * 1e3
            res["floor_fwd_bwd_ms"] = res["min_bytes_moved_fwd_bwd"] / (bw * 1e9) * 1e3
            for row in res["rows"]:
                if "fwd_ms" in row:
                    row["fwd_bandwidth_fraction"] = res["floor_fwd_ms"] / row["fwd_ms"]
                    row["fwd_bwd_bandwidth_fraction"] = res["floor_fwd_bwd_ms"] / row["fwd_bwd_ms"]
        targets = evaluate_targets(results, device)
        targets.update(group_sweep_targets(sweep_results, device))
        try:
            hw["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
        except OSError:
            pass
        report = {
            "benchmark": "nora.bench.kernels",
            "device": device.type,
            "complete": final,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "hardware": hw,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "slow_repeats": args.slow_repeats,
            "copy_bandwidth_GBps": bw,
            "bandwidth_runs": bw_runs,
            "method": (
                "medians over interleaved rounds; ratios to GELU from the same run; floor = minimum "
                "bytes moved (fwd: read x + write y; bwd: read x, grad_y + write grad_x) / copy_ "
                "bandwidth; saved bytes = distinct storages packed by saved_tensors_hooks"
            ),
            "targets": targets,
            "elapsed_s": round(time.perf_counter() - t_start, 1),
            "forms_summary": forms_summary(results, sweep_results),
            "shapes": results,
            "groups_sweep": sweep_results,
        }
        write_json_atomic(out_path, report, indent=1)  # rewritten after every shape: never half a file
        return report

    for shape, groups, dtype in shapes:
        bw = statistics.median(r["copy_GBps"] for r in bw_runs)
        res = bench_shape(
            impls,
            shape,
            groups,
            dtype,
            device,
            args.form,
            args.repeats,
            args.warmup,
            bw,
            slow_repeats=max(1, min(args.slow_repeats, args.repeats)),
            activation=residual_activation(shape, args.residual_activation),
        )
        results.append(res)
        print(format_table(res), flush=True)
        bw_runs.append(copy_bandwidth(device, bw_bytes))
        write(final=False)
    if sweep:
        log.info("group sweep (fused backend, both forms, vs GELU, fwd+bwd, coefficient gradients included):")
        sweep_results.extend(
            run_group_sweep(
                sweep,
                device,
                args.form,
                args.repeats,
                args.warmup,
                statistics.median(r["copy_GBps"] for r in bw_runs),
                residual_choice=args.residual_activation,
            )
        )
    targets = write(final=True)["targets"]
    print(f"targets: {json.dumps(targets, indent=1)}")
    log.info(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
