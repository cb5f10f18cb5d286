"""A core install (`pip install nora`: torch, numpy and safetensors) imports nora and runs the library: apply,
save, load and merge a NoRA adapter, in a fresh interpreter whose only packages are the core ones and what they
need themselves (no site-packages: a directory of links to the installed core distributions and their metadata)."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

CORE = ("torch", "numpy", "safetensors")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(names) -> set[str]:
    """The distributions ``names`` need (their requirements without extras, transitively), normalised."""
    seen, todo = set(), [_norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [_norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in reqs if "extra ==" not in r]
    return seen


def blocked_modules() -> list[str]:
    """Top-level modules of every installed distribution outside the core closure (nora itself aside)."""
    allowed = _closure(CORE) | {"nora"}
    return sorted(
        mod
        for mod, dists in md.packages_distributions().items()
        if not any(_norm(d) in allowed for d in dists) and mod.isidentifier()
    )


def core_site(root: Path) -> Path:
    """A site directory holding only the core closure (links to the installed copies and their metadata) and
    nora: what `pip install nora` brings, and nothing else."""
    allowed = _closure(CORE)
    site = root / "site"
    site.mkdir()
    for mod, dists in md.packages_distributions().items():
        if not mod.isidentifier() or not any(_norm(d) in allowed for d in dists):
            continue
        spec = importlib.util.find_spec(mod)
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            continue
        path = Path(spec.origin).parent if spec.submodule_search_locations else Path(spec.origin)
        if not (site / path.name).exists():
            (site / path.name).symlink_to(path)
    for name in allowed:
        info = Path(md.distribution(name)._path)  # its .dist-info directory, which importlib.metadata reads
        if not (site / info.name).exists():
            (site / info.name).symlink_to(info)
    (site / "nora").symlink_to(Path(__file__).resolve().parents[1] / "nora")
    return site


def core_python(site: Path, code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter without site-packages (-S) whose path is the stdlib and ``site``
    (:func:`core_site`)."""
    script = f"import sys; sys.path.insert(0, {str(site)!r})\n" + textwrap.dedent(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, cwd=site.parent, timeout=300, env=env
    )


LIBRARY_USE = """
import json, tempfile
import torch
from torch import nn
import nora

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)
    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = MLP()
    def forward(self, x):
        return self.mlp(x)

torch.manual_seed(0)
x = torch.randn(4, 8)
model = Net()
base_weights = {{k: v.clone() for k, v in model.state_dict().items()}}
before = model(x).detach()
report = nora.apply_nora(model, nora.NoraConfig(groups=4, backend="torch"))
init_error = (model(x) - before).abs().max().item()
with torch.no_grad():
    for m in nora.nora_modules(model).values():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
trained = model(x).detach()
directory = tempfile.mkdtemp()
nora.save_nora(model, directory)
fresh = Net()
fresh.load_state_dict(base_weights)
fresh = nora.load_nora(fresh, directory)
reload_error = (fresh(x) - trained).abs().max().item()
nora.merge_nora(fresh)
merge_error = (fresh(x) - trained).abs().max().item()
loaded = sorted(m for m in __import__("sys").modules if m.split(".")[0] in {names!r})
print(json.dumps({{"targets": len(report), "init": init_error, "reload": reload_error, "merge": merge_error,
                  "loaded": loaded}}))
"""


def test_core_install_imports_and_runs_the_library(tmp_path):
    blocked = blocked_modules()
    # what the reproduction layers need is outside the core, or the test could not fail
    assert {"omegaconf", "hydra", "peft", "transformers", "timm", "wandb", "matplotlib", "datasets"} <= set(blocked)
    proc = core_python(core_site(tmp_path), LIBRARY_USE.format(names=blocked))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["targets"] == 1 and out["loaded"] == []
    assert out["init"] < 0.05  # the fitted rational in place of GELU (fit error ~3e-3 on [-3, 3])
    assert out["reload"] == 0.0 and out["merge"] < 1e-5


def test_the_core_interpreter_has_nothing_else(tmp_path):
    """The same interpreter cannot import a reproduction layer's dependency (what the test above relies on)."""
    site = core_site(tmp_path)
    proc = core_python(site, "import nora.app.training\n")
    assert proc.returncode != 0 and "ModuleNotFoundError: No module named" in proc.stderr, proc.stderr[-2000:]
    proc = core_python(site, "import omegaconf\n")
    assert proc.returncode != 0 and "No module named 'omegaconf'" in proc.stderr
