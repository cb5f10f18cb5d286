"""Triton backend (CUDA): fused forward, and a backward that recomputes and reduces per program.

Layout: ``x`` is made contiguous and seen as ``(R, D)`` rows with ``D = G * C``. Each program owns
one tile of ``BLOCK_R`` rows x ``BLOCK_C`` channels inside one group, so the coefficients are
scalars for the whole program (loaded once). Sizes that are not multiples of the tile are masked.

* forward: one pass, y = P(x) / Q(x) in float32, stored in x's dtype.
* backward: recomputes P, Q, P', Q' per element, writes grad_x, and reduces the coefficient-gradient
  terms of its tile in registers (``tl.sum``); each program writes one partial row of ``m + 1 + n``
  floats to a ``[num_programs, m + 1 + n]`` buffer (programs ordered row block, group, column
  block), which torch then sums per group in float64 in a fixed order. No atomics: the coefficient
  gradients are bit-identical run after run.

Only ``x`` and the coefficient tensors are saved for backward.

With ``TRITON_INTERPRET=1`` in the environment :func:`rational_triton` also runs on CPU tensors
(Triton's interpreter; slow, tests use small shapes). The variable must be set before triton is
first imported (triton decorates its own library functions such as ``tl.sum`` at import time);
tests therefore run the interpreter checks in a subprocess.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from nora.kernels import Backend, rational_torch, register_backend
from nora.kernels.autograd import rational_autograd
from nora.kernels.safety import SafetyNet
from nora.rational.functional import check_inputs

try:  # triton is optional: without it the backend registers as unavailable, silently
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None
    HAVE_TRITON = False

MAX_NUM_COEFFS = 8  # m + 1 <= 8
MAX_DEN_COEFFS = 8  # n <= 8
# Elements per program (a power of two) and warps per program. Untuned defaults (no GPU was at hand
# when written); NORA_TRITON_BLOCK / NORA_TRITON_WARPS override them (scripts/gpu_check.sh sweeps).
BLOCK_ELEMS = int(os.environ.get("NORA_TRITON_BLOCK", "2048"))
NUM_WARPS = int(os.environ.get("NORA_TRITON_WARPS", "8"))
if BLOCK_ELEMS < 16 or BLOCK_ELEMS & (BLOCK_ELEMS - 1):
    raise ValueError(f"NORA_TRITON_BLOCK must be a power of two >= 16, got {BLOCK_ELEMS}")


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    return HAVE_TRITON and torch.cuda.is_available()


# ----------------------------------------------------------------------------- kernels (sources)
# Plain functions, decorated by _kernels() for the current interpreter setting.

def _rational_fwd(X, Y, NUM, DEN, R, D, C, G, N_CB,
                  M1: tl.constexpr, N: tl.constexpr, FORM_B: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cb = pid % N_CB
    t = pid // N_CB
    g = t % G
    rb = t // G
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None].to(tl.int64) * D + g * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    # P(x), Horner
    p = tl.zeros_like(x) + tl.load(NUM + g * M1 + (M1 - 1))
    for k in tl.static_range(M1 - 2, -1, -1):
        p = p * x + tl.load(NUM + g * M1 + k)
    # Q(x)
    if FORM_B:
        u = x
    else:
        u = tl.abs(x)
    if FORM_B:
        r = tl.zeros_like(x) + tl.load(DEN + g * N + (N - 1))
    else:
        r = tl.zeros_like(x) + tl.abs(tl.load(DEN + g * N + (N - 1)))
    for k in tl.static_range(N - 2, -1, -1):
        if FORM_B:
            r = r * u + tl.load(DEN + g * N + k)
        else:
            r = r * u + tl.abs(tl.load(DEN + g * N + k))
    r = r * u
    if FORM_B:
        q = 1.0 + tl.abs(r)
    else:
        q = 1.0 + r
    y = p / q
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def _rational_bwd(X, GO, GX, NUM, DEN, PART, R, D, C, G, N_CB,
                  M1: tl.constexpr, N: tl.constexpr, FORM_B: tl.constexpr,
                  NEED_COEF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cb = pid % N_CB
    t = pid // N_CB
    g = t % G
    rb = t // G
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None].to(tl.int64) * D + g * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    go = tl.load(GO + offs, mask=mask, other=0.0).to(tl.float32)
    # P and P'
    p = tl.zeros_like(x) + tl.load(NUM + g * M1 + (M1 - 1))
    dp = tl.zeros_like(x) + (M1 - 1) * tl.load(NUM + g * M1 + (M1 - 1))  # 0 when M1 == 1 (P' = 0)
    for k in tl.static_range(M1 - 2, -1, -1):
        ak = tl.load(NUM + g * M1 + k)
        p = p * x + ak
        if k >= 1:
            dp = dp * x + k * ak
    # Q and Q' (R and R' in form B); u is the variable of the denominator polynomial
    if FORM_B:
        u = x
    else:
        u = tl.abs(x)
    bl = tl.load(DEN + g * N + (N - 1))
    if not FORM_B:
        bl = tl.abs(bl)
    r = tl.zeros_like(x) + bl
    dr = tl.zeros_like(x) + N * bl
    for k in tl.static_range(N - 2, -1, -1):
        bk = tl.load(DEN + g * N + k)
        if not FORM_B:
            bk = tl.abs(bk)
        r = r * u + bk
        dr = dr * u + (k + 1) * bk
    r = r * u
    if FORM_B:
        q = 1.0 + tl.abs(r)
        s = tl.where(r > 0.0, 1.0, tl.where(r < 0.0, -1.0, 0.0))
    else:
        q = 1.0 + r
        s = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))
    inv_q = 1.0 / q
    f_over_q = p * inv_q * inv_q
    gx = go * (dp * inv_q - (s * dr) * f_over_q)
    tl.store(GX + offs, gx.to(GX.dtype.element_ty), mask=mask)
    if NEED_COEF:
        gn = go * inv_q
        gd = go * f_over_q
        if FORM_B:
            gd = gd * s
        pw = tl.zeros_like(x) + 1.0
        for i in tl.static_range(M1):
            tl.store(PART + pid * (M1 + N) + i, tl.sum(tl.sum(gn * pw, axis=1), axis=0))
            pw = pw * x
        pw = u
        for j in tl.static_range(N):
            tl.store(PART + pid * (M1 + N) + M1 + j, tl.sum(tl.sum(gd * pw, axis=1), axis=0))
            pw = pw * u


_KERNELS: dict[bool, tuple] = {}


def _kernels():
    """(forward, backward) jitted for the current TRITON_INTERPRET setting (cached per setting)."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    mode = interpret_mode()
    if mode and type(tl.sum).__name__ != "InterpretedFunction":
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported; set it in the "
                           "environment before the process imports triton")
    if mode not in _KERNELS:
        _KERNELS[mode] = (triton.jit(_rational_fwd), triton.jit(_rational_bwd))
    return _KERNELS[mode]


# ----------------------------------------------------------------------------- launch helpers
def _tile(c: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): the widest power-of-two column tile <= 256 dividing C (>= 16), else the
    next power of two >= C (capped at 256) with masking; rows fill the tile up to BLOCK_ELEMS."""
    bc = 256
    while bc > 16 and c % bc:
        bc //= 2
    if c % bc:
        bc = min(256, triton.next_power_of_2(c))
    return max(1, BLOCK_ELEMS // bc), bc


def _grid(x: Tensor, groups: int) -> tuple[int, int, int, int, int, int, int]:
    d = x.shape[-1]
    rows = x.numel() // d if d else 0
    c = d // groups
    block_r, block_c = _tile(c)
    n_cb = triton.cdiv(c, block_c)
    n_rb = triton.cdiv(rows, block_r)
    return rows, d, c, n_cb, n_rb, block_r, block_c


def _device_guard(x: Tensor):
    import contextlib

    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def triton_forward(x: Tensor, numerator: Tensor, denominator: Tensor, form: str) -> Tensor:
    fwd, _ = _kernels()
    x = x.detach().contiguous()
    a = numerator.detach().to(torch.float32).contiguous()
    b = denominator.detach().to(torch.float32).contiguous()
    groups = a.shape[0]
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    rows, d, c, n_cb, n_rb, block_r, block_c = _grid(x, groups)
    with _device_guard(x):
        fwd[(n_rb * groups * n_cb,)](
            x, y, a, b, rows, d, c, groups, n_cb,
            M1=a.shape[1], N=b.shape[1], FORM_B=form == "B", BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=NUM_WARPS)
    return y


def triton_backward(x: Tensor, numerator: Tensor, denominator: Tensor, grad_out: Tensor, form: str,
                    need_coef: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    _, bwd = _kernels()
    x = x.detach().contiguous()
    go = grad_out.detach().to(x.dtype).contiguous()
    a = numerator.detach().to(torch.float32).contiguous()
    b = denominator.detach().to(torch.float32).contiguous()
    groups, m1 = a.shape
    n = b.shape[1]
    k = m1 + n
    gx = torch.empty_like(x)
    if x.numel() == 0:
        z = torch.zeros_like
        return gx, (z(a) if need_coef else None), (z(b) if need_coef else None)
    rows, d, c, n_cb, n_rb, block_r, block_c = _grid(x, groups)
    n_prog = n_rb * groups * n_cb
    part = torch.empty((n_prog if need_coef else 1, k), dtype=torch.float32, device=x.device)
    with _device_guard(x):
        bwd[(n_prog,)](
            x, go, gx, a, b, part, rows, d, c, groups, n_cb,
            M1=m1, N=n, FORM_B=form == "B", NEED_COEF=need_coef, BLOCK_R=block_r,
            BLOCK_C=block_c, num_warps=NUM_WARPS)
    if not need_coef:
        return gx, None, None
    # fixed-order reduction of the per-program rows (programs ordered row block, group, col block)
    tot = part.view(n_rb, groups, n_cb, k).to(torch.float64).sum(dim=(0, 2))
    ga = tot[:, :m1].to(torch.float32)
    gb = -tot[:, m1:]
    if form == "A":
        gb = gb * torch.sign(b).to(torch.float64)
    return gx, ga, gb.to(torch.float32)


TritonRational = rational_autograd("TritonRational", triton_forward, triton_backward)


def _routed_to_torch(x: Tensor, numerator: Tensor, denominator: Tensor, form: str) -> bool:
    """True for inputs the kernels do not cover (float64, degrees beyond their limits), which the pure-torch
    backend serves; raises on inputs no backend accepts and on tensors the kernels cannot reach."""
    check_inputs(x, numerator, denominator, form)
    if (x.dtype == torch.float64 or numerator.shape[1] > MAX_NUM_COEFFS
            or not 1 <= denominator.shape[1] <= MAX_DEN_COEFFS):
        return True
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the 'triton' backend supports float32/bfloat16/float16 inputs, got {x.dtype}")
    if not x.is_cuda and not interpret_mode():
        raise ValueError("the 'triton' backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
    return False


@torch.compiler.disable  # an opaque fused kernel: a clean graph break under torch.compile
def rational_triton(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "A") -> Tensor:
    """The Triton kernels themselves, unchecked (CUDA tensors; CPU tensors under TRITON_INTERPRET=1): what
    the kernel tests and ``scripts/gpu_check.py`` measure. float64 inputs and degrees beyond the kernels'
    limits are routed to the pure-torch backend."""
    if _routed_to_torch(x, numerator, denominator, form):
        return rational_torch(x, numerator, denominator, form)
    return TritonRational.apply(x, numerator, denominator, form)


SAFETY_NET = SafetyNet("triton", rational_triton, triton_forward, triton_backward)


def rational_triton_checked(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "A") -> Tensor:
    """The registered ``triton`` backend: :func:`rational_triton` behind :data:`SAFETY_NET`, which self-checks
    the first call of each shape class and replaces a kernel that fails to build or disagrees with the
    reference (one warning) by torch.compile, then pure torch (see :mod:`nora.kernels.safety`)."""
    if _routed_to_torch(x, numerator, denominator, form):
        return rational_torch(x, numerator, denominator, form)
    return SAFETY_NET.choose(x, numerator, denominator, form)(x, numerator, denominator, form)


register_backend(Backend(
    "triton", rational_triton_checked, ("cuda",), available, priority=30,
    doc="Triton kernels (CUDA); per-program register reduction of coefficient grads, no atomics; "
        "self-checked per shape class, with a torch.compile / torch fallback"))
