"""Fit rational coefficients to an activation, in the denominator form they will be evaluated in.

``fit_rational("gelu", form="A")`` returns a :class:`RationalFit` with the coefficients and the max
and RMS errors over the fitted inputs. The fit is deterministic (float64, fixed iteration counts, no
randomness) and cached on disk under ``$NORA_CACHE_DIR/fits`` (default ``~/.cache/nora/fits``), keyed
by a hash of the target's values on the fit points, the weights, the form and the degrees; a cached
fit is reused only if it matches all of them. No network is involved.

Method: (1) linear least-squares starts (the classic Padé linearisation P - f Q = 0, once with the
form's own |x|^j denominator basis and once with plain x^j), (2) L-BFGS on the weighted mean squared
error of the exact safe form, (3) L-BFGS on a weighted L^p norm with growing p (4, 8, 16) to pull
down the maximum error, keeping the best candidate by max error.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from nora.errors import OutputError
from nora.files import cache_dir, read_json, write_json_atomic
from nora.rational.functional import FORMS, rational_reference

ActivationFn = Callable[[torch.Tensor], torch.Tensor]

ACTIVATIONS: dict[str, ActivationFn] = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "mish": F.mish,
    "relu2": lambda x: F.relu(x).square(),  # ReLU² (Primer, Nemotron)
    "hardswish": F.hardswish,  # x * relu6(x + 3) / 6: on [-3, 3] the polynomial x (x + 3) / 6
    "identity": lambda x: x,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def get_activation(name: str) -> ActivationFn:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(sorted(ACTIVATIONS))} (or pass a callable)")
    return ACTIVATIONS[name]


@dataclass
class RationalFit:
    numerator: list[float]  # a_0 .. a_m
    denominator: list[float]  # b_1 .. b_n
    form: str
    degrees: tuple[int, int]
    max_error: float  # max |F - f| over the fit points
    rms_error: float  # weighted RMS of F - f over the fit points
    x_min: float
    x_max: float
    target: str = "callable"
    extra: dict = field(default_factory=dict)

    def tensors(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.numerator, dtype=dtype), torch.tensor(self.denominator, dtype=dtype))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate this fit (one group) on ``x``."""
        a, b = self.tensors(torch.float64)
        return rational_reference(x.reshape(-1, 1).double(), a[None], b[None], self.form).reshape(x.shape)


def _eval(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, form: str) -> torch.Tensor:
    """One group's P/Q on the 1-D ``x``: the one formula (:func:`rational_reference`), differentiable in a, b."""
    return rational_reference(x[:, None], a[None], b[None], form)[:, 0]


def _linear_start(x, y, w, m, n, abs_basis: bool):
    """Solve min sum w (P(x) - y (1 + sum_j c_j s(x)^j))^2, linear in (a, c)."""
    s = x.abs() if abs_basis else x
    cols = [x**i for i in range(m + 1)] + [-y * s**j for j in range(1, n + 1)]
    A = torch.stack(cols, dim=1) * w.sqrt()[:, None]
    rhs = y * w.sqrt()
    sol = torch.linalg.lstsq(A, rhs[:, None], driver="gelsd").solution.squeeze(1)
    return sol[: m + 1].clone(), sol[m + 1 :].clone()


def _optimise(a, b, x, y, w, form, power: int, iters: int):
    a = a.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [a, b],
        lr=1.0,
        max_iter=iters,
        history_size=50,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )
    scale = y.abs().max().clamp_min(1e-6)

    def closure():
        opt.zero_grad()
        r = (_eval(a, b, x, form) - y) / scale
        loss = (w * r.abs() ** power).sum()
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except RuntimeError:
        pass
    return a.detach(), b.detach()


def _errors(a, b, x, y, w, form):
    with torch.no_grad():
        r = _eval(a, b, x, form) - y
        if not torch.isfinite(r).all():
            return math.inf, math.inf
        return r.abs().max().item(), (w * r * r).sum().sqrt().item()


FIT_VERSION = 1  # bump when the algorithm changes so old cache entries are ignored


def _fit_points(
    x: torch.Tensor | None, x_range: Sequence[float], num_points: int, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, w): float64 fit points on the CPU and their weights normalised to sum 1."""
    if x is None:
        lo, hi = float(x_range[0]), float(x_range[1])
        if not hi > lo:
            raise ValueError(f"x_range must be increasing, got {tuple(x_range)}")
        x = torch.linspace(lo, hi, num_points, dtype=torch.float64)
    x = x.detach().reshape(-1).to(torch.float64).cpu()
    if weights is None:
        return x, torch.full_like(x, 1.0 / x.numel())
    w = weights.detach().reshape(-1).to(torch.float64).cpu()
    if w.shape != x.shape or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative, match x in size, and not all be zero")
    return x, w / w.sum()


def _cache_path(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, form: str, m: int, n: int) -> Path:
    """``$NORA_CACHE_DIR/fits/<hash of the fit points, weights, target values, form, degrees, version>.json``."""
    h = hashlib.sha256()
    for t in (x, w, y):
        h.update(t.numpy().tobytes())
    h.update(f"{form}|{m}|{n}|v{FIT_VERSION}".encode())
    return cache_dir("fits") / f"{h.hexdigest()[:32]}.json"


def _read_cached(path: Path, name: str, x, y, w, form: str, m: int, n: int) -> RationalFit | None:
    """The cached fit at ``path`` if it is what it claims to be, else None (refitted).

    Missing, half-written or from an incompatible version: None. An entry that parses but does not match its key
    (another form or degrees, a numerator or denominator of the wrong length, non-finite coefficients) or whose
    recorded max/RMS errors are not what its coefficients give on these fit points (an edited or damaged entry):
    None, with a warning naming the file."""
    d = read_json(path)
    if d is None:
        return None
    try:
        fit = RationalFit(**{**d, "degrees": tuple(int(v) for v in d["degrees"]), "target": name})
        a, b = (torch.tensor([float(v) for v in c], dtype=torch.float64) for c in (fit.numerator, fit.denominator))
        recorded = (float(fit.max_error), float(fit.rms_error))
    except (TypeError, KeyError, ValueError):
        return None
    why = None
    if fit.form != form or fit.degrees != (m, n) or a.numel() != m + 1 or b.numel() != n:
        why = (
            f"holds form {fit.form!r}, degrees {fit.degrees} with {a.numel()}+{b.numel()} coefficients, "
            f"not form {form!r}, degrees {(m, n)}"
        )
    elif not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        why = "holds non-finite coefficients"
    else:
        actual = _errors(a, b, x, y, w, form)
        if not all(math.isclose(r, v, rel_tol=1e-6, abs_tol=1e-12) for r, v in zip(recorded, actual)):
            why = f"records max error {recorded[0]:.3g} but its coefficients give {actual[0]:.3g} on the fit points"
    if why is not None:
        warnings.warn(f"fit cache entry {path} {why}; refitting", stacklevel=3)
        return None
    return fit


def _best_fit(x, y, w, form: str, m: int, n: int):
    """(max error, RMS error, a, b) of the candidate with the smallest max error (see the module docstring)."""
    starts = [
        _linear_start(x, y, w, m, n, abs_basis=(form == "A")),
        _linear_start(x, y, w, m, n, abs_basis=(form != "A")),
    ]
    # a polynomial start (denominator ~ 0) for targets the linearisation handles badly
    starts.append((_linear_start(x, y, w, m, 0, True)[0], torch.full((n,), 1e-3, dtype=torch.float64)))
    best = None
    for a0, b0 in starts:
        a, b = _optimise(a0, b0, x, y, w, form, power=2, iters=400)
        cand = [(a, b)]
        for p in (4, 8, 16):
            a, b = _optimise(a, b, x, y, w, form, power=p, iters=300)
            cand.append((a, b))
        for a, b in cand:
            mx, rms = _errors(a, b, x, y, w, form)
            if best is None or mx < best[0]:
                best = (mx, rms, a, b)
    return best


def fit_rational(
    target: str | ActivationFn,
    form: str = "A",
    degrees: Sequence[int] = (5, 4),
    x_range: Sequence[float] = (-3.0, 3.0),
    num_points: int = 2001,
    x: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    cache: bool = True,
) -> RationalFit:
    """Fit P/Q of ``degrees`` to ``target`` in denominator ``form``.

    ``target`` is a name from :data:`ACTIVATIONS` or any callable on float64 tensors. Fit points are
    ``num_points`` evenly spaced over ``x_range`` (uniform weights), or the given sample ``x`` with
    optional non-negative ``weights`` (normalised to sum 1): pass a sample of real activation
    inputs to fit where the activation actually operates (see :mod:`nora.rational.calibration`).
    """
    if form not in FORMS:
        raise ValueError(f"unknown denominator form {form!r}; valid forms: {', '.join(FORMS)}")
    m, n = (int(d) for d in degrees)
    if m < 0 or n < 1:
        raise ValueError(f"degrees must be (m >= 0, n >= 1), got {tuple(degrees)}")
    name = target if isinstance(target, str) else getattr(target, "__name__", "callable")
    fn = get_activation(target) if isinstance(target, str) else target
    x, w = _fit_points(x, x_range, num_points, weights)
    with torch.no_grad():
        y = fn(x).to(torch.float64).reshape(-1)
    if not torch.isfinite(y).all():
        raise ValueError("the target activation returned non-finite values on the fit points")
    path = _cache_path(x, w, y, form, m, n) if cache else None
    cached = _read_cached(path, name, x, y, w, form, m, n) if path is not None else None
    if cached is not None:
        return cached
    mx, rms, a, b = _best_fit(x, y, w, form, m, n)
    fit = RationalFit(
        numerator=[float(v) for v in a],
        denominator=[float(v) for v in b],
        form=form,
        degrees=(m, n),
        max_error=mx,
        rms_error=rms,
        x_min=float(x.min()),
        x_max=float(x.max()),
        target=name,
    )
    if path is not None:
        try:
            write_json_atomic(path, asdict(fit), indent=None)
        except OutputError as exc:  # a cache is a convenience: the fit is returned, the next run fits again
            warnings.warn(
                f"{exc}; the fit is not cached: set NORA_CACHE_DIR to a writable folder to keep fits", stacklevel=2
            )
    return fit
