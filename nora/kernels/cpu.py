"""Fused CPU backend: a native C++ extension (``csrc/rational_cpu.cpp``) built on first use.

The extension is compiled with ``torch.utils.cpp_extension.load`` (JIT, ninja) into
``$NORA_CACHE_DIR/ext/<name>`` (default ``~/.cache/nora/ext``), where ``<name>`` carries a hash of
the source, the compiler flags, the torch version, the compiler and the host CPU's feature flags, so a
stale or foreign build is never reused. A process-level file lock (``fcntl.flock``, released by the
kernel if a process dies) serialises concurrent builds from pytest workers or torchrun ranks; once
built, other processes import the cached shared object directly.

Flags: ``-O3 -fopenmp -march=native`` (no ``-ffast-math``: NaN/inf semantics are kept); if that
build fails the extension is built again without ``-march=native``. If no build is possible (no
compiler, build error) or ``NORA_NO_BUILD=1`` is set, :func:`available` returns ``False`` after a
single warning, and ``auto`` selection falls back to the ``torch`` backend.

Forward is one pass over ``x``; backward recomputes P, Q, P', Q' per element, writes ``grad_x`` and
reduces the coefficient gradients per fixed-size work item (independent of the thread count) in a
fixed order: bit-identical coefficient gradients run after run and for any ``torch.set_num_threads``.
The kernels are channel-tiled (each SIMD lane carries its own channel's coefficients, per-channel partial
sums reduced per group at the end), so one rational per channel (G = D) costs what G = 1 costs; each work item
is walked in tiles of 8 rows (coefficients and accumulators loaded once per tile, the next tile prefetched,
a tile's results stored after all its rows are loaded, which avoids 4K-aliasing stalls when a row is a
multiple of 4 KB), 16 lanes wide where AVX-512 is available (8 otherwise; the results are the same).
Only ``x`` and the coefficient tensors are saved for backward. The kernels are ``torch.ops.nora.rational_cpu``
and its backward (custom ops, opaque to torch.compile); the extension is built on the first eager call or,
under torch.compile, when the backend is resolved at trace time, never inside a graph.

The residual form ``phi(x) + (R(x) - R_fit(x))`` (:func:`residual_cpu`, ``torch.ops.nora.residual_cpu``) runs
through the same kernels (a compile-time flag; phi, one of ``KERNEL_ACTIVATIONS``, evaluated in the kernel and chosen
once per tile): saves ``x`` and the four coefficient tensors; ``R`` and ``R_fit`` are computed with the same
instruction sequence, so equal coefficients give exactly ``phi(x)`` and ``grad_out * phi'(x)``; its coefficient
gradients are bit for bit those of :func:`rational_cpu` with the same trained coefficients. Degrees other than
(5, 4) take float32 in the kernel (bfloat16/float16 inputs are upcast here, the result rounded back).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from nora.files import cache_dir, write_text_atomic
from nora.kernels import Backend, rational_torch, register_backend, residual_torch
from nora.kernels.autograd import rational_op, residual_op
from nora.rational.functional import KERNEL_ACTIVATIONS, check_inputs, check_residual_inputs

MAX_COEFFS = 16  # MAXC in the C++ source: m + 1 <= 16 and n <= 16 (larger degrees use `torch`)
SOURCE = Path(__file__).resolve().parent / "csrc" / "rational_cpu.cpp"
BASE_FLAGS = ["-O3", "-fopenmp"]
NATIVE_FLAGS = ["-march=native"]
_EXT_VERSION = 2  # bump to force a rebuild when the Python-side build logic changes

_lock = threading.Lock()
_module = None
_error: str | None = None
_warned = False


def cache_root() -> Path:
    return cache_dir("ext")


def _cpu_fingerprint() -> str:
    """Host CPU feature flags (so a -march=native build is never loaded on a different CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_id() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else cxx
    except Exception:  # no compiler: the build below fails with a clear message
        return cxx


def _ext_name(flags: list[str]) -> str:
    h = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        " ".join(flags).encode(),
        torch.__version__.encode(),
        _compiler_id().encode(),
        _cpu_fingerprint().encode(),
        sys.version.encode(),
        str(_EXT_VERSION).encode(),
    ):
        h.update(part)
        h.update(b"\0")
    return f"nora_rational_cpu_{h.hexdigest()[:16]}"


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # non-POSIX: no inter-process lock (torch's own baton still applies)
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_record(so: Path, flags: list[str]) -> str:
    """What ``BUILD_OK`` records of a finished build: the flags and the shared object's name, size and sha256."""
    return (
        json.dumps(
            {
                "flags": " ".join(flags),
                "file": so.name,
                "size": so.stat().st_size,
                "sha256": hashlib.sha256(so.read_bytes()).hexdigest(),
            }
        )
        + "\n"
    )


def _verified_library(build_dir: Path) -> tuple[Path | None, str | None]:
    """``(shared object, None)`` when ``BUILD_OK`` records it and it has the recorded size and sha256, else
    ``(None, why)``: loading a truncated or overwritten ``.so`` is a SIGBUS, not an ImportError."""
    try:
        rec = json.loads((build_dir / "BUILD_OK").read_text())
        so = build_dir / rec["file"]
        size, digest = int(rec["size"]), str(rec["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, "BUILD_OK records no size and hash of the library (an older build)"
    if not so.is_file():
        return None, f"{so.name} is missing"
    if so.stat().st_size != size:
        return None, f"{so} is {so.stat().st_size} bytes, the build recorded {size}"
    if hashlib.sha256(so.read_bytes()).hexdigest() != digest:
        return None, f"{so} is not the library that was built (sha256 differs)"
    return so, None


def _import_built(name: str, build_dir: Path):
    """Import a finished build after checking it against its record; None (the marker and the library removed,
    forcing a rebuild, with a warning saying why) if it does not match or won't load."""
    so, why = _verified_library(build_dir)
    if so is None:
        warnings.warn(f"compiled kernel in {build_dir}: {why}; rebuilding it", stacklevel=3)
        (build_dir / "BUILD_OK").unlink(missing_ok=True)
        for lib in list(build_dir.glob(f"{name}*.so")) + list(build_dir.glob(f"{name}*.pyd")):
            lib.unlink(missing_ok=True)
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, so)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    except ImportError:
        (build_dir / "BUILD_OK").unlink(missing_ok=True)
        so.unlink(missing_ok=True)
        return None


def _import_cpp_extension():
    """Import torch.utils.cpp_extension without its 'No CUDA runtime is found' log line on CPU hosts."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _build_with(flags: list[str], verbose: bool):
    name = _ext_name(flags)
    build_dir = cache_root() / name
    marker = build_dir / "BUILD_OK"
    if marker.exists():  # fast path: built earlier by this or another process
        mod = _import_built(name, build_dir)
        if mod is not None:
            return mod
    with _file_lock(cache_root() / f"{name}.lock"):
        if marker.exists():  # another process finished the build while we waited
            mod = _import_built(name, build_dir)
            if mod is not None:
                return mod
        build_dir.mkdir(parents=True, exist_ok=True)
        stale = build_dir / "lock"  # torch's own baton, left behind if a build was killed
        if stale.exists():
            stale.unlink()
        mod = _import_cpp_extension().load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=verbose,
        )
        write_text_atomic(marker, _build_record(Path(mod.__file__), flags))
        return mod


def _first_error(exc: Exception) -> str:
    """The first compiler 'error:' line of a failed build (the full log is long), else the message."""
    text = str(exc).strip()
    for line in text.splitlines():
        if "error:" in line or "Error:" in line:
            return line.strip()[:300]
    return text.splitlines()[-1][:300] if text else type(exc).__name__


def load_extension(verbose: bool = False):
    """Build (once, cached) and return the extension module; raise RuntimeError if impossible."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        if os.environ.get("NORA_NO_BUILD", "") not in ("", "0"):
            _error = "disabled by NORA_NO_BUILD=1"
            raise RuntimeError(_error)
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            _error = f"no C++ compiler found ({cxx!r} is not on PATH)"
            raise RuntimeError(_error)
        errors = []
        for flags in (BASE_FLAGS + NATIVE_FLAGS, BASE_FLAGS):
            try:
                _module = _build_with(flags, verbose)
                return _module
            except Exception as exc:  # compiler missing, flag rejected, ...
                errors.append(f"{' '.join(flags)}: {_first_error(exc)}")
        _error = "native build failed (" + "; ".join(errors) + ")"
        raise RuntimeError(_error)


def build_error() -> str | None:
    """Why the extension could not be built or loaded in this process (None: built, or not tried yet)."""
    return _error


def available() -> bool:
    """True if the extension is built (building it on the first call); one warning otherwise."""
    global _warned
    try:
        load_extension()
        return True
    except Exception as exc:
        if not _warned:
            _warned = True
            warnings.warn(
                f"nora: fused CPU backend unavailable ({exc}); falling back to the 'torch' backend",
                RuntimeWarning,
                stacklevel=2,
            )
        return False


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _coefs(numerator: Tensor, denominator: Tensor) -> tuple[Tensor, Tensor]:
    return (numerator.detach().to(torch.float32).contiguous(), denominator.detach().to(torch.float32).contiguous())


def fused_forward(x: Tensor, numerator: Tensor, denominator: Tensor, form: str) -> Tensor:
    """No-autograd forward through the extension (x: CPU float32/bfloat16/float16)."""
    ext = load_extension()
    x = x.detach().contiguous()
    a, b = _coefs(numerator, denominator)
    y = torch.empty_like(x)
    d = x.shape[-1] if x.dim() else 1
    ext.forward(
        x.data_ptr(),
        y.data_ptr(),
        a.data_ptr(),
        b.data_ptr(),
        x.numel(),
        d,
        a.shape[0],
        a.shape[1],
        b.shape[1],
        _DTYPE_CODES[x.dtype],
        form == "B",
    )
    return y


def fused_backward(
    x: Tensor, numerator: Tensor, denominator: Tensor, grad_out: Tensor, form: str, need_coef: bool = True
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """grad_x (x's dtype) and, if ``need_coef``, float32 coefficient gradients (G, m+1), (G, n)."""
    ext = load_extension()
    x = x.detach().contiguous()
    go = grad_out.detach().to(x.dtype).contiguous()
    a, b = _coefs(numerator, denominator)
    gx = torch.empty_like(x)
    ga = torch.empty_like(a) if need_coef else None
    gb = torch.empty_like(b) if need_coef else None
    d = x.shape[-1] if x.dim() else 1
    ext.backward(
        x.data_ptr(),
        go.data_ptr(),
        gx.data_ptr(),
        a.data_ptr(),
        b.data_ptr(),
        ga.data_ptr() if need_coef else 0,
        gb.data_ptr() if need_coef else 0,
        x.numel(),
        d,
        a.shape[0],
        a.shape[1],
        b.shape[1],
        _DTYPE_CODES[x.dtype],
        form == "B",
        need_coef,
    )
    return gx, ga, gb


# torch.ops.nora.rational_cpu and its backward: saves x and the coefficient tensors only; the backward kernel
# recomputes everything. The extension is loaded (built once) inside the ops' implementations, which run eagerly.
rational_cpu_op = rational_op("rational_cpu", fused_forward, fused_backward, device_types="cpu")


def rational_cpu(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "A") -> Tensor:
    """Fused CPU rational; float64 inputs are routed to the pure-torch backend (test oracle dtype)."""
    check_inputs(x, numerator, denominator, form)
    if x.device.type != "cpu":
        raise ValueError(f"the 'cpu' backend needs CPU tensors, got {x.device}")
    if x.dtype == torch.float64 or numerator.shape[1] > MAX_COEFFS or not 1 <= denominator.shape[1] <= MAX_COEFFS:
        return rational_torch(x, numerator, denominator, form)
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"the 'cpu' backend supports float32/bfloat16/float16 inputs, got {x.dtype}")
    return rational_cpu_op(x, numerator, denominator, form)


# --------------------------------------------------------------------------- the residual form
def _is_default_degrees(numerator: Tensor, denominator: Tensor) -> bool:
    """(5, 4): the kernels specialised for it take every I/O dtype; the generic-degree residual kernels take float32
    (bfloat16/float16 inputs are upcast here and the result rounded back: the same values, more memory traffic)."""
    return numerator.shape[1] == 6 and denominator.shape[1] == 4


def fused_residual_forward(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    form: str,
    activation: str,
) -> Tensor:
    """No-autograd ``phi(x) + (R(x) - R_fit(x))`` through the extension (x: CPU float32/bfloat16/float16)."""
    ext = load_extension()
    out_dtype = x.dtype
    x = x.detach().contiguous()
    if not _is_default_degrees(numerator, denominator):
        x = x.float()
    a, b = _coefs(numerator, denominator)
    fa, fb = _coefs(fit_numerator, fit_denominator)
    y = torch.empty_like(x)
    d = x.shape[-1] if x.dim() else 1
    ext.residual_forward(
        x.data_ptr(),
        y.data_ptr(),
        a.data_ptr(),
        b.data_ptr(),
        fa.data_ptr(),
        fb.data_ptr(),
        x.numel(),
        d,
        a.shape[0],
        a.shape[1],
        b.shape[1],
        _DTYPE_CODES[x.dtype],
        form == "B",
        KERNEL_ACTIVATIONS.index(activation),
    )
    return y.to(out_dtype)


def fused_residual_backward(
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
    """grad_x (x's dtype) and, if ``need_coef``, the float32 coefficient gradients of ``R`` (G, m+1), (G, n)."""
    ext = load_extension()
    out_dtype = x.dtype
    x = x.detach().contiguous()
    if not _is_default_degrees(numerator, denominator):
        x = x.float()
    go = grad_out.detach().to(x.dtype).contiguous()
    a, b = _coefs(numerator, denominator)
    fa, fb = _coefs(fit_numerator, fit_denominator)
    gx = torch.empty_like(x)
    ga = torch.empty_like(a) if need_coef else None
    gb = torch.empty_like(b) if need_coef else None
    d = x.shape[-1] if x.dim() else 1
    ext.residual_backward(
        x.data_ptr(),
        go.data_ptr(),
        gx.data_ptr(),
        a.data_ptr(),
        b.data_ptr(),
        fa.data_ptr(),
        fb.data_ptr(),
        ga.data_ptr() if need_coef else 0,
        gb.data_ptr() if need_coef else 0,
        x.numel(),
        d,
        a.shape[0],
        a.shape[1],
        b.shape[1],
        _DTYPE_CODES[x.dtype],
        form == "B",
        KERNEL_ACTIVATIONS.index(activation),
        need_coef,
    )
    return gx.to(out_dtype), ga, gb


# torch.ops.nora.residual_cpu and its backward: saves x and the four coefficient tensors; the backward kernel
# recomputes both rationals and phi.
residual_cpu_op = residual_op("residual_cpu", fused_residual_forward, fused_residual_backward, device_types="cpu")


def residual_cpu(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    form: str = "A",
    activation: str = "none",
) -> Tensor:
    """Fused CPU residual form ``phi(x) + (R(x) - R_fit(x))`` (routing as :func:`rational_cpu`: float64 and degrees
    beyond the kernel's go to the pure-torch backend)."""
    check_residual_inputs(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)
    if x.device.type != "cpu":
        raise ValueError(f"the 'cpu' backend needs CPU tensors, got {x.device}")
    if x.dtype == torch.float64 or numerator.shape[1] > MAX_COEFFS or not 1 <= denominator.shape[1] <= MAX_COEFFS:
        return residual_torch(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"the 'cpu' backend supports float32/bfloat16/float16 inputs, got {x.dtype}")
    return residual_cpu_op(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)


register_backend(
    Backend(
        "cpu",
        rational_cpu,
        ("cpu",),
        available,
        priority=20,
        doc="fused C++ extension (JIT-built once, cached); saves only x; deterministic",
        residual=residual_cpu,
    )
)
