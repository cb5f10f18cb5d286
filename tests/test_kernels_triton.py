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
import warnings
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from test_kernels import DTYPES, check_against_reference, make_coefficients  # noqa: E402

import nora.kernels.triton as tk  # noqa: E402
from nora.kernels import available_backends, backend_names  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton's interpreter truncates float32 -> bfloat16 (see the module docstring)
INTERP_ROUND = {torch.float32: None, torch.bfloat16: 2.0**-7, torch.float16: None}
interpreted = pytest.mark.skipif(
    not INTERPRET, reason="runs in the TRITON_INTERPRET=1 subprocess started by test_triton_interpreter_suite"
)


@pytest.mark.skipif(INTERPRET, reason="already in interpreter mode")
@pytest.mark.slow  # 16 s here: end to end (make test-slow, CI)
def test_triton_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider", "-m", "not slow"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
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
    check_against_reference(
        tk.rational_triton,
        x,
        a,
        b,
        go,
        form,
        f"triton {dtype} {form} {shape} G={groups} ({m},{n})",
        INTERP_ROUND[dtype],
    )


def _edge_inputs(dtype):
    """(x, grad_out, numerator, denominator) with zeros, tiny and huge magnitudes, zero denominator coefficients."""
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
    return x, go, a, b


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("form", ["A", "B"])
def test_triton_interpreter_edge_values(dtype, form):
    x, go, a, b = _edge_inputs(dtype)
    check_against_reference(tk.rational_triton, x, a, b, go, form, f"triton edge {dtype} {form}", INTERP_ROUND[dtype])


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
@pytest.mark.parametrize("checked", [False, True], ids=["kernel", "self-checked"])
def test_triton_saves_only_x(checked, monkeypatch):
    """Also on the first call of a shape class, whose self-check keeps no autograd graph."""
    monkeypatch.setattr(tk.SAFETY_NET, "verdicts", {})
    x = torch.randn(2, 3, 8).requires_grad_()
    a, b = make_coefficients(2, 5, 4, seed=0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        (tk.rational_triton_checked if checked else tk.rational_triton)(x, a, b, "A")
    assert not checked or [c.name for c in tk.SAFETY_NET.verdicts.values()] == ["triton"]
    assert sum(t.numel() * t.element_size() for t in saved) == x.numel() * 4 + (a.numel() + b.numel()) * 4


# ------------------------------------------------------------------ safety net: self-check and fallback
def _identity_fwd(
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
    """A wrong forward kernel (y = x) with the real one's signature: compiles and runs, disagrees."""
    pid = tl.program_id(0)
    rows = (pid // N_DB) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % N_DB) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    tl.store(Y + offs, tl.load(X + offs, mask=mask, other=0.0), mask=mask)


def _broken_fwd(
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
    """A forward kernel Triton cannot build: it calls a function tl does not have."""
    tl.store(Y, tl.this_function_does_not_exist(tl.load(X)))


def _grads(fn, x, a, b, go, form):
    xx, aa, bb = (t.clone().requires_grad_() for t in (x, a, b))
    y = fn(xx, aa, bb, form)
    y.backward(go)
    return y.detach(), xx.grad, aa.grad, bb.grad


def _fallback_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "failed its self-check" in str(w.message)]


@interpreted
def test_triton_build_failure_falls_back_to_compile_then_torch(monkeypatch):
    """The Triton kernels fail to build and torch.compile fails too: one warning each naming the reason, then
    the pure-torch backend, bit for bit; later calls of the same shape class neither re-check nor warn."""
    from nora.kernels import rational_torch, safety

    monkeypatch.setattr(tk.SAFETY_NET, "verdicts", {})
    monkeypatch.setitem(tk._KERNELS, True, (triton.jit(_broken_fwd), tk._kernels()[1]))

    def compile_fails(*args):
        raise RuntimeError("InductorError: no working C++ compiler")

    monkeypatch.setattr(safety, "compiled_reference", compile_fails)
    gen = torch.Generator().manual_seed(5)
    x, go = torch.randn(6, 5, 24, generator=gen), torch.randn(6, 5, 24, generator=gen)
    a, b = make_coefficients(4, 5, 4, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _grads(tk.rational_triton_checked, x, a, b, go, "A")
        again = _grads(tk.rational_triton_checked, x[:2], a, b, go[:2], "A")
    msgs = _fallback_warnings(caught)
    assert len(msgs) == 2, msgs
    assert (
        "the triton rational kernel failed its self-check on cpu, D=24, G=4, degrees (5,4), float32, form A ("
        in msgs[0]
        and "this_function_does_not_exist" in msgs[0]
    )
    assert "using torch.compile for this shape class" in msgs[0] and "\n" not in msgs[0]
    assert "torch.compile rational kernel failed" in msgs[1] and "InductorError: no working C++ compiler" in msgs[1]
    assert msgs[1].endswith("using torch for this shape class instead")
    want = _grads(rational_torch, x, a, b, go, "A")
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(again[0], want[0][:2])
    # another shape class (here: form B) is checked on its own first call
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tk.rational_triton_checked(x, a, b, "B")
    assert len(_fallback_warnings(caught)) == 2


@interpreted
def test_triton_mismatch_falls_back_to_the_next_sound_backend(monkeypatch):
    """A forward kernel that runs but computes the wrong thing is caught on the first call of its shape class;
    the next candidate (torch.compile, here stood in for by the reference math it compiles) passes the check
    and serves the calls; a sound kernel for another dtype keeps running Triton."""
    from nora.kernels import safety
    from nora.rational.functional import rational_reference

    monkeypatch.setattr(tk.SAFETY_NET, "verdicts", {})
    real = tk._kernels()
    monkeypatch.setitem(tk._KERNELS, True, (triton.jit(_identity_fwd), real[1]))
    used = []

    def compiled_stand_in(*args):
        used.append(args[0].shape)
        return rational_reference(*args)

    monkeypatch.setattr(safety, "compiled_reference", compiled_stand_in)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 40, generator=gen)
    a, b = make_coefficients(2, 5, 4, seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = tk.rational_triton_checked(x, a, b, "A")
    msgs = _fallback_warnings(caught)
    assert len(msgs) == 1 and "output differs from the reference" in msgs[0], msgs
    assert "using torch.compile for this shape class instead" in msgs[0]
    assert used and used[-1] == x.shape  # the real call went to the fallback
    torch.testing.assert_close(y, rational_reference(x, a, b, "A"), rtol=0, atol=0)
    # the verdict is per shape class: with the real kernels back, a new class passes and runs Triton
    monkeypatch.setitem(tk._KERNELS, True, real)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        half = x.to(torch.float16)
        check_against_reference(tk.rational_triton_checked, half, a, b, half, "A", "triton after a fallback")
    assert not _fallback_warnings(caught) and len(tk.SAFETY_NET.verdicts) == 2
    assert {c.name for c in tk.SAFETY_NET.verdicts.values()} == {"triton", "torch.compile"}


@interpreted
def test_self_check_accepts_the_real_kernels(monkeypatch):
    """No false alarm: the correct kernels pass their self-check on every test case, dtype and form, edge
    values included (float16 overflow is inf on both sides), so the Triton path stays in use."""
    monkeypatch.setattr(tk.SAFETY_NET, "verdicts", {})
    inputs = []
    for case, (shape, groups, (m, n)) in enumerate(CASES):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(100 + case)) * 2.0
        inputs.append((x, *make_coefficients(groups, m, n, seed=case)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in DTYPES:
            for form in ("A", "B"):
                x, _, a, b = _edge_inputs(dtype)
                tk.SAFETY_NET.choose(x, a, b, form)
                for x, a, b in inputs:
                    tk.SAFETY_NET.choose(x.to(dtype), a, b, form)
    assert not _fallback_warnings(caught), _fallback_warnings(caught)
    assert {c.name for c in tk.SAFETY_NET.verdicts.values()} == {"triton"}
    assert len(tk.SAFETY_NET.verdicts) == len(DTYPES) * 2 * (len(CASES) + 1)


@interpreted
def test_self_check_reports_what_differs():
    from nora.kernels.safety import kernel_probe, self_check

    x = torch.randn(4, 16)
    a, b = make_coefficients(2, 5, 4, seed=1)
    assert self_check(kernel_probe(tk.triton_forward, tk.triton_backward), x, a, b, "B") is None

    def wrong_grad(x, a, b, go, form, need):
        gx, ga, gb = tk.triton_backward(x, a, b, go, form, need)
        return gx, ga, gb * 2

    problem = self_check(kernel_probe(tk.triton_forward, wrong_grad), x, a, b, "B")
    assert problem.startswith("grad_denominator differs from the reference by up to")


@pytest.mark.skipif(INTERPRET, reason="checks the non-interpreted registration")
def test_triton_backend_registration_without_cuda():
    assert "triton" in backend_names()
    if not torch.cuda.is_available():
        assert "triton" not in available_backends("cuda")
        with pytest.raises(ValueError):
            tk.rational_triton(torch.randn(2, 8), *make_coefficients(2, 5, 4, seed=0))


@pytest.mark.skipif(INTERPRET, reason="runs the script, which starts its own interpreter process")
@pytest.mark.slow  # 15 s here: end to end (make test-slow, CI)
def test_gpu_check_script_cpu_path(tmp_path):
    """scripts/gpu_check.sh without a GPU (or with NORA_GPU_CHECK_CPU_ONLY=1): interpreter checks, exit 0."""
    env = dict(os.environ, NORA_GPU_CHECK_OUT=str(tmp_path), NORA_GPU_CHECK_CPU_ONLY="1", PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "checks passed" in out.stdout and "FAIL" not in out.stdout
    assert "CPU-interpreter part only" in out.stdout
    log = (tmp_path / "gpu_check.log").read_text()
    assert "triton interpreter checks (CPU, small shapes) passed" in log


# ------------------------------------------------------------------ custom op and torch.compile
@interpreted
@pytest.mark.parametrize("groups", [1, 3, 48])  # one group, several per tile, one group per channel (G = D)
def test_triton_op_passes_opcheck(groups):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 48, generator=gen).requires_grad_()
    a, b = (t.requires_grad_() for t in make_coefficients(groups, 5, 4, seed=9))
    torch.library.opcheck(tk.rational_triton_op, (x, a, b, "A"))
    go = torch.randn(x.shape, generator=gen)
    torch.library.opcheck(tk.rational_triton_op.backward_op, (x.detach(), a.detach(), b.detach(), go, "B", True))


@interpreted
def test_triton_checked_backend_compiles_without_graph_breaks(monkeypatch):
    """The self-checked backend under torch.compile(fullgraph=True): the self-check runs eagerly at trace time
    (on a synthetic slice), the graph holds the Triton op, and compiled gradients equal eager ones."""
    monkeypatch.setattr(tk.SAFETY_NET, "verdicts", {})
    gen = torch.Generator().manual_seed(4)
    x, go = torch.randn(2, 6, 24, generator=gen), torch.randn(2, 6, 24, generator=gen)
    a, b = make_coefficients(24, 5, 4, seed=4)

    def f(x, a, b):
        return tk.rational_triton_checked(x * 1.5, a, b, "A").sin()

    want = _grads(lambda x, a, b, form: f(x, a, b), x, a, b, go, "A")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(x, a, b)
    assert explained.graph_break_count == 0, explained.break_reasons
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("nora.rational_triton" in o for o in ops), sorted(ops)
    assert [c.name for c in tk.SAFETY_NET.verdicts.values()] == ["triton"]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = _grads(lambda x, a, b, form: compiled(x, a, b), x, a, b, go, "A")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
