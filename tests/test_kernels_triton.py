"""Triton kernels on the CPU through the interpreter (TRITON_INTERPRET=1), small shapes only.

Triton must see ``TRITON_INTERPRET=1`` before it is first imported, so in a normal test session
``test_triton_interpreter_suite`` re-runs this file in a subprocess with the variable set, and the
interpreter tests below run (in that subprocess) only when the variable was set at start-up. The
error bounds are those of ``test_kernels.py`` (same oracle, same helper). On a CUDA machine
``scripts/gpu_check.sh`` runs the compiled kernels against the float64 reference.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from test_kernels import DTYPES, check_against_reference, make_coefficients  # noqa: E402

from nora.kernels import available_backends, backend_names  # noqa: E402
import nora.kernels.triton as tk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton's interpreter truncates float32 -> bfloat16 (see the module docstring)
INTERP_ROUND = {torch.float32: None, torch.bfloat16: 2.0 ** -7, torch.float16: None}
interpreted = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 subprocess "
                                 "started by test_triton_interpreter_suite")


@pytest.mark.skipif(INTERPRET, reason="already in interpreter mode")
def test_triton_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider",
                          "-m", "not slow"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    print(out.stdout[-4000:])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and " failed" not in out.stdout


# odd sizes (masked tiles), G = 1, G = D, a column tile narrower than C, other degrees
CASES = [
    ((3, 5, 24), 4, (5, 4)),
    ((7, 40), 1, (5, 4)),
    ((2, 3, 6), 6, (5, 4)),
    ((5, 300), 3, (3, 2)),
    ((4, 20), 2, (7, 7)),
    ((3, 17), 1, (0, 1)),
]


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_interpreter_matches_reference(dtype, form, case):
    shape, groups, (m, n) = CASES[case]
    gen = torch.Generator().manual_seed(100 + case)
    x = (torch.randn(shape, generator=gen) * 2.0).to(dtype)
    go = torch.randn(shape, generator=gen).to(dtype)
    a, b = make_coefficients(groups, m, n, seed=case)
    check_against_reference(tk.rational_triton, x, a, b, go, form,
                            f"triton {dtype} {form} {shape} G={groups} ({m},{n})", INTERP_ROUND[dtype])


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("form", ["A", "B"])
def test_triton_interpreter_edge_values(dtype, form):
    gen = torch.Generator().manual_seed(7)
    mags = torch.tensor([0.0, 1e-3, 0.5, 3.0, 300.0, 1e3, 1e4])
    x = mags[torch.randint(0, len(mags), (3, 4 * 24), generator=gen)]
    x = x * torch.where(torch.rand(x.shape, generator=gen) < 0.5, -1.0, 1.0)
    x[:, ::5] = 0.0
    x = x.to(dtype)
    go = torch.randn(x.shape, generator=gen).to(dtype)
    a, b = make_coefficients(4, 5, 4, seed=11)
    b[0, :3] = 0.0
    b[2, 0] = 0.0
    b[:, 3] = b[:, 3].sign() * b[:, 3].abs().clamp(min=0.5)
    a[:, 5] = a[:, 5].clamp(-0.5, 0.5)
    check_against_reference(tk.rational_triton, x, a, b, go, form, f"triton edge {dtype} {form}",
                            INTERP_ROUND[dtype])


@interpreted
def test_triton_interpreter_non_contiguous_and_deterministic():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 9, 16, generator=gen)
    x = base.transpose(0, 1)[:, ::2]
    assert not x.is_contiguous()
    go = torch.randn(x.shape, generator=gen)
    a, b = make_coefficients(4, 5, 4, seed=2)
    check_against_reference(tk.rational_triton, x, a, b, go, "A", "triton non-contiguous")
    grads = []
    for _ in range(3):
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        tk.rational_triton(x, aa, bb, "B").backward(go)
        grads.append((aa.grad, bb.grad))
    assert all(torch.equal(g[0], grads[0][0]) and torch.equal(g[1], grads[0][1]) for g in grads)


@interpreted
def test_triton_saves_only_x():
    x = torch.randn(2, 3, 8).requires_grad_()
    a, b = make_coefficients(2, 5, 4, seed=0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        tk.rational_triton(x, a, b, "A")
    assert sum(t.numel() * t.element_size() for t in saved) == x.numel() * 4 + (a.numel() + b.numel()) * 4


@pytest.mark.skipif(INTERPRET, reason="checks the non-interpreted registration")
def test_triton_backend_registration_without_cuda():
    assert "triton" in backend_names()
    if not torch.cuda.is_available():
        assert "triton" not in available_backends("cuda")
        with pytest.raises(ValueError):
            tk.rational_triton(torch.randn(2, 8), *make_coefficients(2, 5, 4, seed=0))


@pytest.mark.skipif(INTERPRET, reason="runs the script, which starts its own interpreter process")
def test_gpu_check_script_cpu_path(tmp_path):
    """scripts/gpu_check.sh without a GPU (or with NORA_GPU_CHECK_CPU_ONLY=1): interpreter checks, exit 0."""
    env = dict(os.environ, NORA_GPU_CHECK_OUT=str(tmp_path), NORA_GPU_CHECK_CPU_ONLY="1", PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "checks passed" in out.stdout and "FAIL" not in out.stdout
    assert "CPU-interpreter part only" in out.stdout
    log = (tmp_path / "gpu_check.log").read_text()
    assert "triton interpreter checks (CPU, small shapes) passed" in log
