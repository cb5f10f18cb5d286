"""Triton backend (CUDA): fused forward, and a backward that recomputes and reduces per program.

Layout: ``x`` is made contiguous and seen as ``(R, D)`` rows with ``D = G * C``. A program owns a tile of
``BLOCK_R`` rows x ``BLOCK_D`` channels, anywhere in the row: the tile may hold many groups (``C`` small, up
to one group per channel, ``G = D``) or a slice of one wide group; every column loads the coefficients of its
own group (``g = column // C``, a gather from a tiny, cached table). Sizes that are not multiples of the tile
are masked.

* forward: one pass, y = P(x) / Q(x) in float32, stored in x's dtype.
* residual form (``residual_triton``, :mod:`nora.rational.functional`): the same kernel bodies with RESIDUAL and
  ACT constexpr flags evaluate y = phi(x) + (R(x) - R_fit(x)) and grad_x = go (phi'(x) + (R'(x) - R_fit'(x))),
  phi one of ``ACT_CODES`` (gelu through ``tl.math.erf``, gelu_tanh through exp, silu, relu with relu'(0) = 0;
  "none": no phi), and the coefficient gradients of R only (the fit is frozen). Both rationals are evaluated by
  the same device function, so with numerator == fit numerator and denominator == fit denominator (bitwise) the
  difference is exactly 0: y is the kernel's phi(x) (exactly 0 with "none"), grad_x is go phi'(x).
* backward: recomputes P, Q, P', Q' per element and writes grad_x. For the coefficient gradients each program
  walks a fixed strip of row tiles of its column block and accumulates, per column, the ``m + 1 + n``
  gradient terms summed over its rows, in registers; at the end it writes one partial row per coefficient
  (``[row programs, m + 1 + n, D]`` buffer, no per-element atomics). Torch then sums the partials in float64
  in a fixed order, over row programs and over the ``C`` channels of each group: the coefficient gradients are
  bit-identical run after run, for any G from 1 to D.

The kernels are launched through ``torch.library.wrap_triton`` inside ``torch.library.triton_op``s
(``torch.ops.nora.rational_triton``, ``torch.ops.nora.residual_triton`` and their ``_backward``), so inductor sees
the kernels themselves. Under the interpreter (below) the ops are plain ``custom_op``s: an interpreted kernel
cannot run on fake tensors.

Only ``x`` and the coefficient tensors are saved for backward (the fit's too, in the residual form).

With ``TRITON_INTERPRET=1`` in the environment :func:`rational_triton` and :func:`residual_triton` also run on
CPU tensors (Triton's interpreter; slow, tests use small shapes). The variable must be set before triton is
first imported (triton decorates its own library functions such as ``tl.sum`` at import time);
tests therefore run the interpreter checks in a subprocess.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from nora.kernels import Backend, rational_torch, register_backend, residual_torch
from nora.kernels.autograd import rational_op, residual_op
from nora.kernels.safety import RESIDUAL, SafetyNet
from nora.rational.functional import check_inputs, check_residual_inputs

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
# One source for the plain rational and the residual form: the bodies below take constexpr flags (RESIDUAL, ACT)
# and are jitted device functions (inlined); the four kernels are two-line entry points around them, so the plain
# kernels keep their launch signature (no argument of the residual form, no default arguments, which torch's
# analysis of user kernels under torch.compile does not fill in). Device functions are jitted when this module is
# imported (for the TRITON_INTERPRET setting of that moment), the entry kernels by _kernels().


def _identity(fn):
    return fn


_device_fn = triton.jit if HAVE_TRITON else _identity

# codes of the activations the residual kernels evaluate themselves (the ACT constexpr)
ACT_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "relu": 4}


@_device_fn
def _tanh(z):
    """tanh(z) = sign(z) (1 - e) / (1 + e), e = exp(-2 |z|) (no overflow), and its derivative 4 e / (1 + e)^2."""
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(z < 0.0, -t, t)
    return t, 4.0 * e / ((1.0 + e) * (1.0 + e))


@_device_fn
def _sigmoid(x):
    """1 / (1 + exp(-x)) from e = exp(-|x|) (no overflow)."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@_device_fn
def _phi(x, ACT: tl.constexpr):
    """phi(x) in float32 for ACT = ACT_CODES[name], torch's formulas (ACT 0, "none": not called)."""
    if ACT == 1:  # gelu: x / 2 (1 + erf(x / sqrt 2))
        y = x * 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:  # gelu_tanh: x / 2 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        t, _ = _tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x)))
        y = 0.5 * x * (1.0 + t)
    elif ACT == 3:  # silu: x sigmoid(x)
        y = x * _sigmoid(x)
    elif ACT == 4:  # relu
        y = tl.where(x > 0.0, x, 0.0)
    else:
        y = tl.zeros_like(x)
    return y


@_device_fn
def _dphi(x, ACT: tl.constexpr):
    """phi'(x) in float32 (torch's backward formulas; relu'(0) = 0)."""
    if ACT == 1:  # gelu: cdf + x pdf
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        d = cdf + x * (0.3989422804014327 * tl.exp(-0.5 * (x * x)))
    elif ACT == 2:  # gelu_tanh
        x_sq = x * x
        t, sech2 = _tanh(0.7978845608028654 * (x + 0.044715 * (x_sq * x)))
        d = 0.5 * (1.0 + t) + (0.5 * x) * sech2 * (0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x_sq))
    elif ACT == 3:  # silu: s (1 + x (1 - s))
        s = _sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 4:  # relu
        d = tl.where(x > 0.0, 1.0, 0.0)
    else:
        d = tl.zeros_like(x)
    return d


@_device_fn
def _ratio(x, u, NUM, DEN, a_off, b_off, cmask, M1: tl.constexpr, N: tl.constexpr, FORM_B: tl.constexpr):
    """P(x) / Q(x) with each column's own coefficients (Horner); u = x (form B) or |x| (form A, DEN holds |b|)."""
    p = tl.zeros_like(x) + tl.load(NUM + a_off + (M1 - 1), mask=cmask, other=0.0)[None, :]
    for k in tl.static_range(M1 - 2, -1, -1):
        p = p * x + tl.load(NUM + a_off + k, mask=cmask, other=0.0)[None, :]
    r = tl.zeros_like(x) + tl.load(DEN + b_off + (N - 1), mask=cmask, other=0.0)[None, :]
    for k in tl.static_range(N - 2, -1, -1):
        r = r * u + tl.load(DEN + b_off + k, mask=cmask, other=0.0)[None, :]
    r = r * u
    if FORM_B:
        q = 1.0 + tl.abs(r)
    else:
        q = 1.0 + r
    return p / q


@_device_fn
def _ratio_grad(x, u, NUM, DEN, a_off, b_off, cmask, M1: tl.constexpr, N: tl.constexpr, FORM_B: tl.constexpr):
    """(dF/dx, 1/Q, P/Q^2, s): s = sign(R) in form B (it scales the denominator gradients), sign(x) in form A."""
    al = tl.load(NUM + a_off + (M1 - 1), mask=cmask, other=0.0)[None, :]
    p = tl.zeros_like(x) + al
    dp = tl.zeros_like(x) + (M1 - 1) * al  # 0 when M1 == 1 (P' = 0)
    for k in tl.static_range(M1 - 2, -1, -1):
        ak = tl.load(NUM + a_off + k, mask=cmask, other=0.0)[None, :]
        p = p * x + ak
        if k >= 1:
            dp = dp * x + k * ak
    # Q and Q' (R and R' in form B)
    bl = tl.load(DEN + b_off + (N - 1), mask=cmask, other=0.0)[None, :]
    r = tl.zeros_like(x) + bl
    dr = tl.zeros_like(x) + N * bl
    for k in tl.static_range(N - 2, -1, -1):
        bk = tl.load(DEN + b_off + k, mask=cmask, other=0.0)[None, :]
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
    return dp * inv_q - (s * dr) * f_over_q, inv_q, f_over_q, s


@_device_fn
def _fwd_body(
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
    RESIDUAL: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """y = P/Q, or with RESIDUAL y = phi(x) + (P/Q - P_fit/Q_fit) (both rationals by the same code)."""
    pid = tl.program_id(0)
    db = pid % N_DB
    rb = pid // N_DB
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = db * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows[:, None] < R) & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    grp = cols // C  # the group of each column
    a_off = grp * M1
    b_off = grp * N
    if FORM_B:
        u = x
    else:
        u = tl.abs(x)
    y = _ratio(x, u, NUM, DEN, a_off, b_off, cmask, M1, N, FORM_B)
    if RESIDUAL:
        y = y - _ratio(x, u, FNUM, FDEN, a_off, b_off, cmask, M1, N, FORM_B)  # exactly 0 for equal coefficients
        if ACT != 0:
            y = _phi(x, ACT) + y
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@_device_fn
def _bwd_body(
    X,
    GO,
    GX,
    NUM,
    DEN,
    FNUM,
    FDEN,
    PART,
    R,
    D,
    C,
    N_DB,
    N_RP,
    ITERS,
    M1: tl.constexpr,
    N: tl.constexpr,
    FORM_B: tl.constexpr,
    NEED_COEF: tl.constexpr,
    RESIDUAL: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad_x = go dF/dx (RESIDUAL: go (phi' + (dF/dx - dF_fit/dx))) and the per-program partial sums of the
    coefficient-gradient terms of F = P/Q (never of the fit)."""
    pid = tl.program_id(0)
    db = pid % N_DB
    rp = pid // N_DB  # this program's row strip: row tiles rp, rp + N_RP, rp + 2 N_RP, ...
    cols = db * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    grp = cols // C
    a_off = grp * M1
    b_off = grp * N
    # per-column running sums of the M1 + N coefficient-gradient terms (a fixed-size register tile)
    acc = tl.zeros((16, BLOCK_D), dtype=tl.float32)
    kidx = tl.arange(0, 16)[:, None]
    for it in range(0, ITERS):
        rows = (rp + it * N_RP) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < R) & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        go = tl.load(GO + offs, mask=mask, other=0.0).to(tl.float32)
        if FORM_B:  # the variable of the denominator polynomial
            u = x
        else:
            u = tl.abs(x)
        dfdx, inv_q, f_over_q, s = _ratio_grad(x, u, NUM, DEN, a_off, b_off, cmask, M1, N, FORM_B)
        if RESIDUAL:
            dfit, _, _, _ = _ratio_grad(x, u, FNUM, FDEN, a_off, b_off, cmask, M1, N, FORM_B)
            dfdx = dfdx - dfit  # exactly 0 for equal coefficients
            if ACT != 0:
                dfdx = _dphi(x, ACT) + dfdx
        gx = go * dfdx
        tl.store(GX + offs, gx.to(GX.dtype.element_ty), mask=mask)
        if NEED_COEF:
            gn = go * inv_q
            gd = go * f_over_q
            if FORM_B:
                gd = gd * s
            pw = tl.zeros_like(x) + 1.0
            for i in tl.static_range(M1):
                acc += tl.where(kidx == i, tl.sum(gn * pw, axis=0)[None, :], 0.0)
                pw = pw * x
            pw = u
            for j in tl.static_range(N):
                acc += tl.where(kidx == M1 + j, tl.sum(gd * pw, axis=0)[None, :], 0.0)
                pw = pw * u
    if NEED_COEF:
        kmask = (kidx < M1 + N) & cmask[None, :]
        tl.store(PART + (rp * (M1 + N) + kidx).to(tl.int64) * D + cols[None, :], acc, mask=kmask)


# entry kernels (plain functions, decorated by _kernels() / _residual_kernels() for the current interpreter setting)
def _rational_fwd(
    X,
    Y,
    NUM,
    DEN,
    R,
    D,
    C,
    N_DB,
    M1: tl.constexpr,
    N: tl.constexpr,
    FORM_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    _fwd_body(X, Y, NUM, DEN, NUM, DEN, R, D, C, N_DB, M1, N, FORM_B, False, 0, BLOCK_R, BLOCK_D)


def _rational_bwd(
    X,
    GO,
    GX,
    NUM,
    DEN,
    PART,
    R,
    D,
    C,
    N_DB,
    N_RP,
    ITERS,
    M1: tl.constexpr,
    N: tl.constexpr,
    FORM_B: tl.constexpr,
    NEED_COEF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    _bwd_body(
        X,
        GO,
        GX,
        NUM,
        DEN,
        NUM,
        DEN,
        PART,
        R,
        D,
        C,
        N_DB,
        N_RP,
        ITERS,
        M1,
        N,
        FORM_B,
        NEED_COEF,
        False,
        0,
        BLOCK_R,
        BLOCK_D,
    )


def _residual_fwd(
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
    _fwd_body(X, Y, NUM, DEN, FNUM, FDEN, R, D, C, N_DB, M1, N, FORM_B, True, ACT, BLOCK_R, BLOCK_D)


def _residual_bwd(
    X,
    GO,
    GX,
    NUM,
    DEN,
    FNUM,
    FDEN,
    PART,
    R,
    D,
    C,
    N_DB,
    N_RP,
    ITERS,
    M1: tl.constexpr,
    N: tl.constexpr,
    FORM_B: tl.constexpr,
    NEED_COEF: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    _bwd_body(
        X,
        GO,
        GX,
        NUM,
        DEN,
        FNUM,
        FDEN,
        PART,
        R,
        D,
        C,
        N_DB,
        N_RP,
        ITERS,
        M1,
        N,
        FORM_B,
        NEED_COEF,
        True,
        ACT,
        BLOCK_R,
        BLOCK_D,
    )


_KERNELS: dict[bool, tuple] = {}
_RESIDUAL_KERNELS: dict[bool, tuple] = {}


def _mode() -> bool:
    """The interpreter setting, checked against what triton and the device functions were set up with."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    mode = interpret_mode()
    if mode and type(tl.sum).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported; set it in the "
            "environment before the process imports triton"
        )
    if mode != (type(_fwd_body).__name__ == "InterpretedFunction"):
        raise RuntimeError(
            "TRITON_INTERPRET changed after nora.kernels.triton was imported; set it (or not) in the "
            "environment before the process starts"
        )
    return mode


def _kernels():
    """(forward, backward) of the plain rational, jitted for the current TRITON_INTERPRET setting (cached)."""
    mode = _mode()
    if mode not in _KERNELS:
        _KERNELS[mode] = (triton.jit(_rational_fwd), triton.jit(_rational_bwd))
    return _KERNELS[mode]


def _residual_kernels():
    """(forward, backward) of the residual form, as :func:`_kernels`."""
    mode = _mode()
    if mode not in _RESIDUAL_KERNELS:
        _RESIDUAL_KERNELS[mode] = (triton.jit(_residual_fwd), triton.jit(_residual_bwd))
    return _RESIDUAL_KERNELS[mode]


# ----------------------------------------------------------------------------- launch helpers
MAX_BLOCK_D = 128  # channels per tile (a power of two); rows fill the tile up to BLOCK_ELEMS
ROW_PROGRAMS = 256  # target row programs x column blocks of the backward (its partial buffer's rows)


def _tile(d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): the next power of two >= D capped at MAX_BLOCK_D (masked), rows up to BLOCK_ELEMS."""
    bd = min(MAX_BLOCK_D, triton.next_power_of_2(max(d, 1)))
    return max(1, BLOCK_ELEMS // bd), bd


def _layout(x: Tensor, groups: int) -> tuple[int, int, int, int, int, int, int]:
    d = x.shape[-1]
    rows = x.numel() // d if d else 0
    block_r, block_d = _tile(d)
    return rows, d, d // groups, triton.cdiv(d, block_d), triton.cdiv(rows, block_r), block_r, block_d


def _device_guard(x: Tensor):
    import contextlib

    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _den_table(denominator: Tensor, form: str) -> Tensor:
    """The denominator coefficients as the kernels read them: b_j (form B) or |b_j| (form A), float32."""
    b = denominator.detach().to(torch.float32)
    return (b if form == "B" else b.abs()).contiguous()


def _launcher(kernel):
    # under torch.library.triton_op the launch must go through wrap_triton (it returns interpreted kernels as is)
    return torch.library.wrap_triton(kernel)


def _forward(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    form: str,
    fit: tuple[Tensor, Tensor] | None = None,
    activation: str = "none",
) -> Tensor:
    """y = P/Q, or with ``fit`` the residual form phi(x) + (P/Q - P_fit/Q_fit)."""
    fwd = _kernels()[0] if fit is None else _residual_kernels()[0]
    x = x.detach().contiguous()
    a = numerator.detach().to(torch.float32).contiguous()
    b = _den_table(denominator, form)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    rows, d, c, n_db, n_rb, block_r, block_d = _layout(x, a.shape[0])
    consts = dict(M1=a.shape[1], N=b.shape[1], FORM_B=form == "B")
    with _device_guard(x):
        if fit is None:
            _launcher(fwd)[(n_rb * n_db,)](
                x, y, a, b, rows, d, c, n_db, **consts, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=NUM_WARPS
            )
        else:
            fa = fit[0].detach().to(torch.float32).contiguous()
            fb = _den_table(fit[1], form)
            _launcher(fwd)[(n_rb * n_db,)](
                x,
                y,
                a,
                b,
                fa,
                fb,
                rows,
                d,
                c,
                n_db,
                **consts,
                ACT=ACT_CODES[activation],
                BLOCK_R=block_r,
                BLOCK_D=block_d,
                num_warps=NUM_WARPS,
            )
    return y


def _backward(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    grad_out: Tensor,
    form: str,
    need_coef: bool,
    fit: tuple[Tensor, Tensor] | None = None,
    activation: str = "none",
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """grad_x and the coefficient gradients of P/Q (with ``fit``: of the residual form, the fit frozen)."""
    bwd = _kernels()[1] if fit is None else _residual_kernels()[1]
    x = x.detach().contiguous()
    go = grad_out.detach().to(x.dtype).contiguous()
    a = numerator.detach().to(torch.float32).contiguous()
    b = _den_table(denominator, form)
    groups, m1 = a.shape
    n = b.shape[1]
    k = m1 + n
    gx = torch.empty_like(x)
    if x.numel() == 0:
        return gx, torch.zeros_like(a), torch.zeros_like(b)
    rows, d, c, n_db, n_rb, block_r, block_d = _layout(x, groups)
    n_rp = max(1, min(n_rb, ROW_PROGRAMS // n_db))  # row programs (fixed by the shape: deterministic)
    iters = triton.cdiv(n_rb, n_rp)
    part = torch.empty((n_rp if need_coef else 1, k, d if need_coef else 1), dtype=torch.float32, device=x.device)
    consts = dict(M1=m1, N=n, FORM_B=form == "B", NEED_COEF=need_coef)
    with _device_guard(x):
        if fit is None:
            _launcher(bwd)[(n_rp * n_db,)](
                x,
                go,
                gx,
                a,
                b,
                part,
                rows,
                d,
                c,
                n_db,
                n_rp,
                iters,
                **consts,
                BLOCK_R=block_r,
                BLOCK_D=block_d,
                num_warps=NUM_WARPS,
            )
        else:
            fa = fit[0].detach().to(torch.float32).contiguous()
            fb = _den_table(fit[1], form)
            _launcher(bwd)[(n_rp * n_db,)](
                x,
                go,
                gx,
                a,
                b,
                fa,
                fb,
                part,
                rows,
                d,
                c,
                n_db,
                n_rp,
                iters,
                **consts,
                ACT=ACT_CODES[activation],
                BLOCK_R=block_r,
                BLOCK_D=block_d,
                num_warps=NUM_WARPS,
            )
    if not need_coef:
        return gx, None, None
    # fixed-order reduction of the per-program partial rows: over row programs, then the C channels of a group
    tot = part.to(torch.float64).sum(dim=0).view(k, groups, c).sum(dim=-1).t()  # (G, K)
    ga = tot[:, :m1].to(torch.float32)
    gb = -tot[:, m1:]
    if form == "A":
        gb = gb * torch.sign(denominator.detach()).to(torch.float64)
    return gx, ga, gb.to(torch.float32)


def triton_forward(x: Tensor, numerator: Tensor, denominator: Tensor, form: str) -> Tensor:
    return _forward(x, numerator, denominator, form)


def triton_backward(
    x: Tensor, numerator: Tensor, denominator: Tensor, grad_out: Tensor, form: str, need_coef: bool = True
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    return _backward(x, numerator, denominator, grad_out, form, need_coef)


def triton_residual_forward(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    form: str,
    activation: str,
) -> Tensor:
    return _forward(x, numerator, denominator, form, (fit_numerator, fit_denominator), activation)


def triton_residual_backward(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    grad_out: Tensor,
    form: str,
    activation: str,
    need_coef: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    return _backward(x, numerator, denominator, grad_out, form, need_coef, (fit_numerator, fit_denominator), activation)


# torch.ops.nora.rational_triton / residual_triton and their backwards: triton_ops on CUDA (inductor sees the
# kernels), plain custom ops under the interpreter (an interpreted kernel cannot run on fake tensors, so those get
# fake implementations)
rational_triton_op = rational_op(
    "rational_triton", triton_forward, triton_backward, triton=HAVE_TRITON and not interpret_mode()
)
residual_triton_op = residual_op(
    "residual_triton", triton_residual_forward, triton_residual_backward, triton=HAVE_TRITON and not interpret_mode()
)


def _routed_to_torch(x: Tensor, numerator: Tensor, denominator: Tensor, form: str) -> bool:
    """True for inputs the kernels do not cover (float64, degrees beyond their limits), which the pure-torch
    backend serves; raises on inputs no backend accepts and on tensors the kernels cannot reach."""
    check_inputs(x, numerator, denominator, form)
    if (
        x.dtype == torch.float64
        or numerator.shape[1] > MAX_NUM_COEFFS
        or not 1 <= denominator.shape[1] <= MAX_DEN_COEFFS
    ):
        return True
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the 'triton' backend supports float32/bfloat16/float16 inputs, got {x.dtype}")
    if not x.is_cuda and not interpret_mode():
        raise ValueError("the 'triton' backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
    return False


def _residual_routed_to_torch(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    form: str,
    activation: str,
) -> bool:
    """:func:`_routed_to_torch` for the residual form (also: an activation the kernels do not evaluate)."""
    check_residual_inputs(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)
    return _routed_to_torch(x, numerator, denominator, form) or activation not in ACT_CODES


def rational_triton(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "A") -> Tensor:
    """The Triton kernels themselves, unchecked (CUDA tensors; CPU tensors under TRITON_INTERPRET=1): what
    the kernel tests and ``scripts/gpu_check.py`` measure. float64 inputs and degrees beyond the kernels'
    limits are routed to the pure-torch backend."""
    if _routed_to_torch(x, numerator, denominator, form):
        return rational_torch(x, numerator, denominator, form)
    return rational_triton_op(x, numerator, denominator, form)


def residual_triton(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    form: str = "A",
    activation: str = "none",
) -> Tensor:
    """The residual form ``phi(x) + (R(x) - R_fit(x))`` by the Triton kernels, unchecked (routed as
    :func:`rational_triton`)."""
    if _residual_routed_to_torch(x, numerator, denominator, fit_numerator, fit_denominator, form, activation):
        return residual_torch(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)
    return residual_triton_op(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)


SAFETY_NET = SafetyNet("triton", rational_triton, triton_forward, triton_backward)
RESIDUAL_SAFETY_NET = SafetyNet(
    "triton", residual_triton, triton_residual_forward, triton_residual_backward, family=RESIDUAL
)


def rational_triton_checked(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "A") -> Tensor:
    """The registered ``triton`` backend: :func:`rational_triton` behind :data:`SAFETY_NET`, which self-checks
    the first call of each shape class and replaces a kernel that fails to build or disagrees with the
    reference (one warning) by torch.compile, then pure torch (see :mod:`nora.kernels.safety`)."""
    if _routed_to_torch(x, numerator, denominator, form):
        return rational_torch(x, numerator, denominator, form)
    return SAFETY_NET.choose(x, numerator, denominator, form)(x, numerator, denominator, form)


def residual_triton_checked(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    form: str = "A",
    activation: str = "none",
) -> Tensor:
    """The registered ``triton`` backend's residual form: :func:`residual_triton` behind
    :data:`RESIDUAL_SAFETY_NET` (shape classes also per activation; fallbacks torch.compile of
    ``residual_reference``, then ``residual_torch``)."""
    args = (x, numerator, denominator, fit_numerator, fit_denominator, form, activation)
    if _residual_routed_to_torch(*args):
        return residual_torch(*args)
    return RESIDUAL_SAFETY_NET.choose(*args)(*args)


register_backend(
    Backend(
        "triton",
        rational_triton_checked,
        ("cuda",),
        available,
        priority=30,
        doc="Triton kernels (CUDA); per-program register reduction of coefficient grads, no atomics; "
        "self-checked per shape class, with a torch.compile / torch fallback",
        residual=residual_triton_checked,
    )
)
