"""Backends that evaluate a group-wise rational function and its gradients.

Every backend computes exactly the math of :mod:`nora.rational.functional` and has the signature

    fn(x, numerator (G, m+1), denominator (G, n), form) -> y

with gradients for ``x`` and both coefficient tensors. Backends are chosen per call:
``backend=None``/``"auto"`` picks the fastest one available for ``x.device`` (see
:func:`resolve_backend`); a name forces one. The environment variable ``NORA_BACKEND`` overrides
``"auto"`` globally (handy for tests and benchmarks).

Registered backends
-------------------
``reference``  plain autograd over torch ops: slow and memory-hungry, the oracle for tests.
``torch``      a custom autograd Function with the hand-derived gradients: saves only ``x`` and
               recomputes in backward; pure torch, runs anywhere.
Further backends register themselves from their own modules: ``cpu`` (fused C++ extension,
:mod:`nora.kernels.cpu`) and ``triton`` (:mod:`nora.kernels.triton`; self-checked on the first call of
each shape class, with a torch.compile / torch fallback, see :mod:`nora.kernels.safety`). Every kernel
backend is a pair of ``torch.library`` custom ops (``torch.ops.nora.rational_<backend>`` and its
``_backward``, registered by :func:`nora.kernels.autograd.rational_op`), so ``torch.compile`` traces a model
of rational activations without a graph break: one opaque op per activation.

Under ``torch.compile`` the backend is chosen once per (name, device type) at trace time, eagerly and outside
the graph (:func:`resolved_backend_name`, a constant to dynamo): the extension build, the warnings and the
environment lookup never enter the traced region.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from nora.kernels.autograd import REFERENCE_MATH, rational_op, residual_op
from nora.rational.functional import (
    check_residual_inputs,
    rational_backward,
    rational_forward,
    rational_reference,
    residual_backward,
    residual_forward,
    residual_reference,
)

BackendFn = Callable[[Tensor, Tensor, Tensor, str], Tensor]
# (x, numerator, denominator, fit_numerator, fit_denominator, form, activation) -> phi(x) + R(x) - R_fit(x)
ResidualFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, str, str], Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: BackendFn
    devices: tuple[str, ...]  # device types it runs on
    available: Callable[[], bool]  # cheap check (may trigger a cached build)
    priority: int  # higher wins in "auto" selection
    doc: str = ""
    residual: ResidualFn | None = None  # the residual form (every built-in backend has one)


_REGISTRY: dict[str, Backend] = {}
_warned: set[str] = set()


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def available_backends(device_type: str | None = None) -> list[str]:
    """Names of the backends that can run on ``device_type`` (all devices if None), best first."""
    _load_optional_backends()
    out = [b for b in _REGISTRY.values() if (device_type is None or device_type in b.devices) and _is_available(b)]
    return [b.name for b in sorted(out, key=lambda b: -b.priority)]


def backend_names() -> list[str]:
    _load_optional_backends()
    return sorted(_REGISTRY)


def _is_available(b: Backend) -> bool:
    try:
        return bool(b.available())
    except Exception as exc:  # a broken optional backend must never crash a run
        if b.name not in _warned:
            _warned.add(b.name)
            warnings.warn(f"nora: backend {b.name!r} is unavailable ({exc}); using the next best one", stacklevel=2)
        return False


def resolve_backend(name: str | None, device: torch.device | str) -> Backend:
    """Return the backend to use for tensors on ``device``.

    ``None``/``"auto"`` choose the highest-priority available backend for the device type (after
    ``NORA_BACKEND`` if set). Naming an unknown backend raises, listing the valid names; naming a
    known one that cannot run on this device raises too.
    """
    _load_optional_backends()
    device_type = torch.device(device).type
    if name in (None, "auto"):
        name = os.environ.get("NORA_BACKEND") or "auto"
    if name == "auto":
        names = available_backends(device_type)
        if not names:
            raise RuntimeError(f"no rational backend can run on device type {device_type!r}")
        return _REGISTRY[names[0]]
    if name not in _REGISTRY:
        raise ValueError(f"unknown rational backend {name!r}; valid: auto, {', '.join(sorted(_REGISTRY))}")
    b = _REGISTRY[name]
    if device_type not in b.devices:
        raise ValueError(f"backend {name!r} runs on {', '.join(b.devices)}, not on {device_type!r}")
    if not _is_available(b):
        raise RuntimeError(f"backend {name!r} is not available here (see the warning above)")
    return b


@torch.compiler.assume_constant_result
def resolved_backend_name(name: str | None, device_type: str) -> str:
    """The backend :func:`resolve_backend` picks, by name. Under torch.compile dynamo runs this eagerly at trace
    time and bakes the answer into the graph (so a backend build or a warning never happens inside it)."""
    return resolve_backend(name, device_type).name


def exporting_to_onnx() -> bool:
    """True while ``torch.onnx.export`` traces (either exporter): the backends then give way to the ``reference`` math,
    plain torch ops that every ONNX exporter translates (the custom ops have no ONNX translation)."""
    return torch.onnx.is_in_onnx_export()


def reference_decompositions() -> dict:
    """Every nora custom op (each backend's forward) -> the plain-torch math it computes, to pass to
    ``ExportedProgram.run_decompositions``: ``torch.export.export`` keeps the ops (the program then gives the eager
    model's outputs bit for bit and runs where nora is imported); decomposed with this table it holds only aten ops
    (and runs without nora: AOTInductor, ExecuTorch, ``torch.export.load`` anywhere)."""
    _load_optional_backends()
    return dict(REFERENCE_MATH)


def rational(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "A", backend: str | None = None) -> Tensor:
    """Evaluate the group-wise rational ``P(x)/Q(x)`` with the chosen backend (the ``reference`` math while
    exporting to ONNX: :func:`exporting_to_onnx`)."""
    if exporting_to_onnx():
        return rational_reference(x, numerator, denominator, form)
    if torch.compiler.is_compiling():
        return _REGISTRY[resolved_backend_name(backend, x.device.type)].fn(x, numerator, denominator, form)
    return resolve_backend(backend, x.device).fn(x, numerator, denominator, form)


def residual_rational(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    form: str = "A",
    activation: str = "none",
    backend: str | None = None,
) -> Tensor:
    """The residual form ``phi(x) + (R(x) - R_fit(x))`` (:mod:`nora.rational.functional`) with the chosen backend:
    ``phi`` one of ``KERNEL_ACTIVATIONS`` (``"none"``: the difference alone), ``R`` the rational of the trained
    coefficients, ``R_fit`` that of the frozen fit (same shapes). Exactly ``phi(x)`` while the two are equal. While
    exporting to ONNX: the ``reference`` math (:func:`exporting_to_onnx`)."""
    if exporting_to_onnx():
        return residual_reference(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)
    if torch.compiler.is_compiling():
        b = _REGISTRY[resolved_backend_name(backend, x.device.type)]
    else:
        b = resolve_backend(backend, x.device)
    if b.residual is None:
        raise ValueError(f"backend {b.name!r} has no residual form")
    return b.residual(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)


# --------------------------------------------------------------------------- built-in backends
# saves only x and the coefficients; recomputes P and Q in backward (hand-derived gradients)
rational_torch_op = rational_op("rational_torch", rational_forward, rational_backward)


residual_torch_op = residual_op("residual_torch", residual_forward, residual_backward)


def rational_torch(x: Tensor, numerator: Tensor, denominator: Tensor, form: str = "A") -> Tensor:
    return rational_torch_op(x, numerator, denominator, form)


def residual_torch(
    x: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    fit_numerator: Tensor,
    fit_denominator: Tensor,
    form: str = "A",
    activation: str = "none",
) -> Tensor:
    check_residual_inputs(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)
    return residual_torch_op(x, numerator, denominator, fit_numerator, fit_denominator, form, activation)


register_backend(
    Backend(
        "reference",
        rational_reference,
        ("cpu", "cuda", "mps", "xpu"),
        lambda: True,
        priority=0,
        doc="plain autograd (slow; saves every intermediate)",
        residual=residual_reference,
    )
)
register_backend(
    Backend(
        "torch",
        rational_torch,
        ("cpu", "cuda", "mps", "xpu"),
        lambda: True,
        priority=10,
        doc="custom autograd.Function with analytic gradients; saves only x",
        residual=residual_torch,
    )
)

_OPTIONAL = ("nora.kernels.cpu", "nora.kernels.triton")
_optional_loaded = False


def _load_optional_backends() -> None:
    """Import the optional backend modules once; each registers itself if it can exist here."""
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    import importlib

    for mod in _OPTIONAL:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # the module exists but a dependency is missing
                warnings.warn(f"nora: optional backend module {mod} could not load ({exc})", stacklevel=2)
        except Exception as exc:
            warnings.warn(f"nora: optional backend module {mod} could not load ({exc})", stacklevel=2)
