"""A core install (`pip install nora`: torch, numpy and safetensors) imports nora and runs the library: apply,
save, load and merge a NoRA adapter, in a fresh interpreter that cannot import any other installed package."""
from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
import textwrap

CORE = ("torch", "numpy", "safetensors")


def _closure(names) -> set[str]:
    """The distributions ``names`` need (their requirements without extras, transitively), normalised."""
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    seen, todo = set(), [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in reqs if "extra ==" not in r]
    return seen


def blocked_modules() -> list[str]:
    """Top-level modules of every installed distribution outside the core closure (nora itself aside)."""
    allowed = _closure(CORE) | {"nora"}
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    return sorted(mod for mod, dists in md.packages_distributions().items()
                  if not any(norm(d) in allowed for d in dists) and mod.isidentifier())


BLOCKER = """
import importlib.abc, sys
BLOCKED = set({blocked!r})
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (a core install has only torch, numpy, safetensors)")
        return None
sys.meta_path.insert(0, Block())
"""

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
    # the blocker must cover what the reproduction layers need, or the test could not fail
    assert {"omegaconf", "hydra", "peft", "transformers", "timm", "wandb", "matplotlib", "datasets"} <= set(blocked)
    script = BLOCKER.format(blocked=blocked) + LIBRARY_USE.format(names=sorted(set(blocked)))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["targets"] == 1 and out["loaded"] == []
    assert out["init"] < 0.05          # the fitted rational in place of GELU (fit error ~3e-3 on [-3, 3])
    assert out["reload"] == 0.0 and out["merge"] < 1e-5


def test_the_blocker_blocks(tmp_path):
    """The same interpreter set-up refuses a reproduction-layer import (what the test above relies on)."""
    script = BLOCKER.format(blocked=blocked_modules()) + "import nora.app.training\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "a core install has only torch, numpy, safetensors" in proc.stderr
