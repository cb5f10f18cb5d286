"""The wheel built from this repository declares what nora imports: the library's own dependencies unconditionally,
the rest as extras, every one of them pinned in requirements.txt; it carries the LICENSE."""

import ast
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = {"torch", "numpy", "safetensors"}  # import nora, apply_nora, save/load/merge_nora
EXTRAS = {"peft", "hub", "train", "eval", "slurm", "test"}
# imported by nora but not declared: triton ships with torch's CUDA wheels and is optional (kernels/triton.py)
NOT_DECLARED = {"triton"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "nora", src / "nora", ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(out), "-q"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(out.glob("nora-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    return Parser().parsestr(meta), names


def _requirements(meta):
    """{(distribution, extra or None)} of the wheel's Requires-Dist."""
    reqs = set()
    for line in meta.get_all("Requires-Dist") or []:
        name = _norm(re.match(r"[A-Za-z0-9_.\-]+", line).group(0))
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", line)
        reqs.add((name, extra.group(1) if extra else None))
    return reqs


def _imported_distributions() -> set[str]:
    top = set()
    for path in (ROOT / "nora").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                top |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top.add(node.module.split(".")[0])
    dists = md.packages_distributions()
    return {_norm(d) for m in top - set(sys.stdlib_module_names) - {"nora"} - NOT_DECLARED for d in dists.get(m, [m])}


def test_wheel_declares_core_dependencies_and_extras(metadata):
    meta, names = metadata
    reqs = _requirements(meta)
    assert {n for n, e in reqs if e is None} == CORE
    assert set(meta.get_all("Provides-Extra")) == EXTRAS
    assert meta["License-Expression"] == "Apache-2.0"
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "nora/kernels/csrc/rational_cpu.cpp" in names  # the JIT-built kernel's source travels with the wheel


def test_every_imported_package_is_declared_and_pinned(metadata):
    meta, _ = metadata
    declared = {n for n, _ in _requirements(meta)} - {"nora"}
    imported = _imported_distributions()
    assert imported - declared == set(), "imported by nora/ but not in pyproject.toml"
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)==([^\s#]+)", line)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    assert declared - set(pins) == set(), "declared in pyproject.toml but not pinned in requirements.txt"
    for dist in declared & set(pins):  # the pins satisfy the declared lower bounds: they are what ran
        assert md.version(dist) == pins[dist], dist
