"""Read run directories (never re-train): ``summary.json``, ``config.yaml``, ``mmlu.json`` and base-model evaluations.

A run directory is any directory holding a ``summary.json`` (written by ``nora.run.run_training``); only runs
whose summary says ``"status": "complete"`` enter a table, the others are counted as incomplete. A base-model
MMLU evaluation is a directory holding ``mmlu.json`` but no ``summary.json`` (``python eval.py model=<name>``
writes ``runs/eval/<model.name>/mmlu.json``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

SKIP_DIRS = {"checkpoints", "adapter", "wandb", ".hydra", ".submitit", "__pycache__"}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def hardware_label(hw: dict | None, world_size: int | None = None) -> str:
    """'NVIDIA H200' / 'CPU: <model> (2 cores)', with 'x N' for N processes."""
    if not hw:
        return "unknown hardware"
    label = hw.get("gpu") or f"CPU: {hw.get('cpu', '?')} ({hw.get('cpu_cores', '?')} cores)"
    if world_size and int(world_size) > 1:
        label += f" x {int(world_size)}"
    return label


@dataclass
class Run:
    dir: Path
    summary: dict
    mmlu: dict | None = None
    _config: Any = field(default=None, repr=False)

    # --- summary fields
    @property
    def method(self) -> str:
        return self.summary.get("method", "?")

    @property
    def model(self) -> str:
        return self.summary.get("model", "?")

    @property
    def dataset(self) -> str:
        return self.summary.get("dataset", "?")

    @property
    def seed(self) -> int | None:
        s = self.summary.get("seed")
        return int(s) if s is not None else None

    @property
    def name(self) -> str:
        return self.summary.get("run_name") or self.dir.name

    @property
    def config_hash(self) -> str:
        return self.summary.get("config_hash") or "?"

    @property
    def date(self) -> str:
        return str(self.summary.get("date") or "?")[:10]

    @property
    def hardware(self) -> str:
        return hardware_label(self.summary.get("hardware"), self.summary.get("world_size"))

    @property
    def accuracy(self) -> float | None:
        """Final evaluation accuracy in percent (vision runs)."""
        v = self.summary.get("final_accuracy")
        if v is None:
            v = (self.summary.get("final") or {}).get("accuracy")
        return float(v) if v is not None else None

    @property
    def trainable(self) -> int | None:
        return (self.summary.get("parameters") or {}).get("trainable")

    @property
    def percent(self) -> float | None:
        return (self.summary.get("parameters") or {}).get("percent")

    # --- config.yaml (resolved config of the run)
    @property
    def config(self) -> dict:
        if self._config is None:
            path = self.dir / "config.yaml"
            cfg = {}
            if path.exists():
                import yaml

                try:
                    cfg = yaml.safe_load(path.read_text()) or {}
                except yaml.YAMLError:
                    cfg = {}
            self._config = cfg
        return self._config

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A value of the run's config (``method.nora.r``), or ``default`` when absent."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return default if node is None else node

    # --- mmlu.json
    def mmlu_accuracy(self, category: str | None = None) -> float | None:
        """MMLU accuracy in percent: overall (``category=None``) or of one category."""
        return mmlu_accuracy(self.mmlu, category)


def mmlu_accuracy(mmlu: dict | None, category: str | None = None) -> float | None:
    if not mmlu:
        return None
    node = mmlu.get("overall") if category is None else (mmlu.get("categories") or {}).get(category)
    if not node or node.get("accuracy") is None:
        return None
    return 100.0 * float(node["accuracy"])


@dataclass
class BaseEval:
    """A base model's MMLU evaluation (no training run)."""
    dir: Path
    mmlu: dict

    @property
    def names(self) -> set[str]:
        """The directory's name (``runs/eval/<model.name>``) and the names ``mmlu.json`` records."""
        out = {self.dir.name}
        m = self.mmlu.get("model")
        if isinstance(m, dict):
            out |= {str(m[k]) for k in ("name", "hf_name", "model") if m.get(k)}
        elif isinstance(m, str):
            out.add(m)
        return out

    @property
    def date(self) -> str:
        return str(self.mmlu.get("date") or "?")[:10]


@dataclass
class Collection:
    runs: list[Run] = field(default_factory=list)
    incomplete: list[Path] = field(default_factory=list)
    base_evals: list[BaseEval] = field(default_factory=list)

    def select(self, **where) -> list[Run]:
        """Runs whose summary fields equal the given values (a tuple/list/set value means 'any of')."""
        out = []
        for r in self.runs:
            ok = True
            for k, v in where.items():
                have = getattr(r, k) if hasattr(Run, k) else r.summary.get(k)
                if isinstance(v, (tuple, list, set, frozenset)):
                    ok = have in v
                else:
                    ok = have == v
                if not ok:
                    break
            if ok:
                out.append(r)
        return out

    def base_eval(self, *names: str) -> BaseEval | None:
        """The newest base-model evaluation recorded under any of ``names`` (config name or hub id)."""
        found = [b for b in self.base_evals if b.names & set(names)]
        return max(found, key=lambda b: b.date) if found else None


def _walk(root: Path) -> Iterable[tuple[Path, set[str]]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        yield Path(dirpath), set(filenames)


def collect(*roots: str | os.PathLike) -> Collection:
    """Every run directory and base-model evaluation under ``roots`` (missing roots are empty)."""
    col = Collection()
    seen: set[Path] = set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for d, files in _walk(root):
            key = d.resolve()
            if key in seen:
                continue
            if "summary.json" in files:
                seen.add(key)
                s = _read_json(d / "summary.json")
                if not s or s.get("status") != "complete":
                    col.incomplete.append(d)
                    continue
                mmlu = _read_json(d / "mmlu.json") if "mmlu.json" in files else None
                col.runs.append(Run(d, s, mmlu))
            elif "mmlu.json" in files:
                seen.add(key)
                m = _read_json(d / "mmlu.json")
                if m:
                    col.base_evals.append(BaseEval(d, m))
    col.runs.sort(key=lambda r: (str(r.dir)))
    return col
