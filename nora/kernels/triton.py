"""Triton backend (CUDA): fused forward, and a backward that recomputes and reduces per program.

Layout: ``x`` is made contiguous and seen as ``(R, D)`` rows with ``D = G * C``. A program owns a tile of
``BLOCK_R`` rows x ``BLOCK_D`` channels, anywhere in the row: the tile may hold many groups (``C`` small, up
to one group per channel, ``G = D``) or a slice of one wide group; every column loads the coefficients of its
own group (``g = column // C``, a gather from a tiny, cached table). Sizes that are not multiples of the tile
are masked.

* forward: one pass, y = P(x) / Q(x) in float32, stored in x's dtype.
* backward: recomputes P, Q, P', Q' per element and writes grad_x. For the coefficient gradients each program
  walks a fixed strip of row tiles of its column block and accumulates, per column, the ``m + 1 + n``
  gradient terms summed over its rows, in registers; at the end it writes one partial row per coefficient
  (``[row programs, m + 1 + n, D]`` buffer, no per-element atomics). Torch then sums the partials in float64
  in a fixed order, over row programs and over the ``C`` channels of each group: the coefficient gradients are
  bit-identical run after run, for any G from 1 to D.

Both kernels are launched through ``torch.library.wrap_triton`` inside ``torch.library.triton_op``s
(``torch.ops.nora.rational_triton`` and ``..._backward``), so inductor sees the kernels themselves. Under the
interpreter (below) the ops are plain ``custom_op``s: an interpreted kernel cannot run on fake tensors.

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

from nora.kernels import Backend, rational_torch, register_backend, residual_torch
from nora.kernels.autograd import rational_op
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

def _rational_fwd(X, Y, NUM, DEN, R, D, C, N_DB,
                  M1: tl.constexpr, N: tl.constexpr, FORM_B: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
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
    # P(x), Horner, with each column's own coefficients
    p = tl.zeros_like(x) + tl.load(NUM + a_off + (M1 - 1), mask=cmask, other=0.0)[None, :]
    for k in tl.static_range(M1 - 2, -1, -1):
        p = p * x + tl.load(NUM + a_off + k, mask=cmask, other=0.0)[None, :]
    # Q(x)
    if FORM_B:
        u = x
    else:
        u = tl.abs(x)
    bl = tl.load(DEN + b_off + (N - 1), mask=cmask, other=0.0)[None, :]
    r = tl.zeros_like(x) + bl
    for k in tl.static_range(N - 2, -1, -1):
        bk = tl.load(DEN + b_off + k, mask=cmask, other=0.0)[None, :]
        r = r * u + bk
    r = r * u
    if FORM_B:
        q = 1.0 + tl.abs(r)
    else:
        q = 1.0 + r
    y = p / q
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def _rational_bwd(X, GO, GX, NUM, DEN, PART, R, D, C, N_DB, N_RP, ITERS,
                  M1: tl.constexpr, N: tl.constexpr, FORM_B: tl.constexpr,
                  NEED_COEF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
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
        # P and P'
        al = tl.load(NUM + a_off + (M1 - 1), mask=cmask, other=0.0)[None, :]
        p = tl.zeros_like(x) + al
        dp = tl.zeros_like(x) + (M1 - 1) * al  # 0 when M1 == 1 (P' = 0)
        for k in tl.static_range(M1 - 2, -1, -1):
            ak = tl.load(NUM + a_off + k, mask=cmask, other=0.0)[None, :]
            p = p * x + ak
            if k >= 1:
                dp = dp * x + k * ak
        # Q and Q' (R and R' in form B); u is the variable of the denominator polynomial
        if FORM_B:
            u = x
        else:
            u = tl.abs(x)
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
        gx = go * (dp * inv_q - (s * dr) * f_over_q)
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


def triton_forward(x: Tensor, numerator: Tensor, denominator: Tensor, form: str) -> Tensor:
    fwd, _ = _kernels()
    x = x.detach().contiguous()
    a = numerator.detach().to(torch.float32).contiguous()
    b = _den_table(denominator, form)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    rows, d, c, n_db, n_rb, block_r, block_d = _layout(x, a.shape[0])
    with _device_guard(x):
        _launcher(fwd)[(n_rb * n_db,)](
            x, y, a, b, rows, d, c, n_db,
            M1=a.shape[1], N=b.shape[1], FORM_B=form == "B", BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=NUM_WARPS)
    return y


def triton_backward(x: Tensor, numerator: Tensor, denominator: Tensor, grad_out: Tensor, form: str,
                    need_coef: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    _, bwd = _kernels()
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
    with _device_guard(x):
        _launcher(bwd)[(n_rp * n_db,)](
            x, go, gx, a, b, part, rows, d, c, n_db, n_rp, iters,
            M1=m1, N=n, FORM_B=form == "B", NEED_COEF=need_coef, BLOCK_R=block_r,
            BLOCK_D=block_d, num_warps=NUM_WARPS)
    if not need_coef:
        return gx, None, None
    # fixed-order reduction of the per-program partial rows: over row programs, then the C channels of a group
    tot = part.to(torch.float64).sum(dim=0).view(k, groups, c).sum(dim=-1).t()  # (G, K)
    ga = tot[:, :m1].to(torch.float32)
    gb = -tot[:, m1:]
    if form == "A":
        gb = gb * torch.sign(denominator.detach()).to(torch.float64)
    return gx, ga, gb.to(torch.float32)


# torch.ops.nora.rational_triton and its backward: triton_ops on CUDA (inductor sees the kernels), plain custom
# ops under the interpreter (an interpreted kernel cannot run on fake tensors, so those get fake implementations)
rational_triton_op = rational_op("rational_triton", triton_forward, triton_backward,
                                 triton=HAVE_TRITON and not interpret_mode())


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


def rational_triton(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "A") -> Tensor:
    """The Triton kernels themselves, unchecked (CUDA tensors; CPU tensors under TRITON_INTERPRET=1): what
    the kernel tests and ``scripts/gpu_check.py`` measure. float64 inputs and degrees beyond the kernels'
    limits are routed to the pure-torch backend."""
    if _routed_to_torch(x, numerator, denominator, form):
        return rational_torch(x, numerator, denominator, form)
    return rational_triton_op(x, numerator, denominator, form)


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
        "self-checked per shape class, with a torch.compile / torch fallback",
    residual=residual_torch))  # TODO(residual kernel): the Triton residual form
