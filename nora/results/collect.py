"""Read run directories (never re-train): ``summary.json``, ``config.yaml``, ``mmlu.json`` and base-model evaluations.

A run directory is any directory holding a ``summary.json`` (written by ``nora.app.training.run_training``; the
layout is :mod:`nora.runs.layout`); only runs whose summary says ``"status": "complete"`` enter a table, the others
are counted as incomplete. A base-model MMLU evaluation is a directory holding ``mmlu.json`` but no ``summary.json``
(``python eval.py model=<name>`` writes ``runs/eval/<model.name>/mmlu.json``). A file that is there but cannot be
read (truncated JSON, not UTF-8, YAML that does not parse) leaves its run out of every table and is listed in
:attr:`Collection.unreadable`, so a table never shows n=4 for five seeds without saying why (a run's unreadable
``mmlu.json`` is listed too; that run counts as not evaluated). A value that no run writes is treated the same: an
accuracy that is not a finite number in range (``final_accuracy`` NaN, Infinity, 1e9 or ``"abc"``; an ``mmlu.json``
accuracy outside [0, 1]) or a seed that is no integer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from nora.files import read_json
from nora.runs.layout import ADAPTER, CHECKPOINTS, MMLU, SUMMARY, WANDB, RunDir, read_stored_config
from nora.schema import is_number

SKIP_DIRS = {CHECKPOINTS, ADAPTER, WANDB, ".hydra", ".submitit", "__pycache__"}


class Unreadable(Exception):
    """A run file exists but does not parse."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


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
    config: dict = field(default_factory=dict, repr=False)  # the resolved config.yaml ({} when the run has none)
    # a newer run of the same seed that took this one's place in a table cell (nora.results.tables.by_seed)
    shadowed_by: "Run | None" = field(default=None, repr=False, compare=False)

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
    unreadable: dict[Path, str] = field(default_factory=dict)  # {file: why it could not be read} (module doc)

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


def _walk(root: Path, unreadable: dict[Path, str]) -> Iterable[tuple[Path, set[str]]]:
    """Every directory under ``root`` with its file names. Symlinked directories are followed (``runs/demo ->
    /scratch/...``), each real directory once (a link back up the tree does not loop); a directory that cannot be
    listed (no permission) is recorded in ``unreadable``, never skipped silently."""
    visited: set[str] = set()

    def refused(exc: OSError) -> None:
        if isinstance(exc, FileNotFoundError):  # a missing root (or a directory removed meanwhile): nothing there
            return
        path = Path(exc.filename) if exc.filename else root
        unreadable[path] = f"cannot be read ({exc.strerror or exc}); its runs are left out"

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=refused):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        yield Path(dirpath), set(filenames)


def _read_dict(path: Path) -> dict:
    """The JSON object in ``path`` (which exists); :class:`Unreadable` when it is not one."""
    try:
        d = read_json(path)
    except OSError as exc:  # no permission (another user's 0600 file), an I/O error
        raise Unreadable(path, f"cannot be read ({exc.strerror or exc})") from None
    if not isinstance(d, dict):
        raise Unreadable(path, "not a JSON object (truncated or corrupted?)")
    return d


def _is_finite_number(v) -> bool:
    return is_number(v) and math.isfinite(v)


def check_summary(path: Path, summary: dict) -> None:
    """:class:`Unreadable` when a complete run's ``summary.json`` holds a value no run writes: an accuracy that is
    not a finite number of percent in [0, 100], a seed that is not an integer (a table would show nan, inf or
    > 100%, or stop on a traceback)."""
    acc = {
        "final_accuracy": summary.get("final_accuracy"),
        "final.accuracy": (summary.get("final") or {}).get("accuracy")
        if isinstance(summary.get("final"), dict)
        else None,
    }
    for key, v in acc.items():
        if v is not None and not (_is_finite_number(v) and 0 <= v <= 100):
            raise Unreadable(
                path, f"{key}={v!r} is not an accuracy (a finite number of percent in [0, 100]); the run is left out"
            )
    seed = summary.get("seed")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)):
        raise Unreadable(path, f"seed={seed!r} is not an integer; the run is left out")


def check_mmlu(path: Path, mmlu: dict) -> None:
    """:class:`Unreadable` when an ``mmlu.json`` holds an accuracy that is not a finite fraction in [0, 1]."""
    nodes = {"overall": mmlu.get("overall")}
    cats = mmlu.get("categories")
    if isinstance(cats, dict):
        nodes.update({f"categories.{k}": v for k, v in cats.items()})
    for key, node in nodes.items():
        v = node.get("accuracy") if isinstance(node, dict) else None
        if v is not None and not (_is_finite_number(v) and 0 <= v <= 1):
            raise Unreadable(path, f"{key}.accuracy={v!r} is not an accuracy (a finite fraction in [0, 1])")


def _read_config(run: RunDir) -> dict:
    try:
        return read_stored_config(run) or {}
    except Exception as exc:  # OmegaConf/YAML raise many types for a file that does not parse
        mark = getattr(exc, "problem_mark", None)  # yaml's errors say what and where
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise Unreadable(
            run.config, f"does not parse as YAML ({getattr(exc, 'problem', None) or type(exc).__name__}{where})"
        ) from None


def collect(*roots: str | os.PathLike) -> Collection:
    """Every run directory and base-model evaluation under ``roots`` (missing roots are empty)."""
    col = Collection()
    seen: set[Path] = set()
    for root in roots:
        for d, files in _walk(Path(root), col.unreadable):  # a missing root yields nothing
            key = d.resolve()
            if key in seen or not {SUMMARY, MMLU} & files:
                continue
            seen.add(key)
            try:
                _collect_dir(col, d, files)
            except Unreadable as exc:
                col.unreadable[exc.path] = exc.why
    col.runs.sort(key=lambda r: str(r.dir))
    return col


def _collect_dir(col: Collection, d: Path, files: set[str]) -> None:
    """Add what ``d`` holds to ``col``; :class:`Unreadable` when its summary, config or base-model evaluation
    does not parse (the run is left out). A run's unreadable ``mmlu.json`` is listed, and the run counts as not
    MMLU-evaluated yet (``mmlu-jobs`` lists it again)."""
    run = RunDir(d)
    if SUMMARY not in files:
        mmlu = _read_dict(run.mmlu)
        check_mmlu(run.mmlu, mmlu)
        col.base_evals.append(BaseEval(d, mmlu))
        return
    summary = _read_dict(run.summary)
    if summary.get("status") != "complete":
        col.incomplete.append(d)
        return
    check_summary(run.summary, summary)
    mmlu = None
    if MMLU in files:
        try:
            read = _read_dict(run.mmlu)
            check_mmlu(run.mmlu, read)
            mmlu = read
        except Unreadable as exc:
            col.unreadable[exc.path] = f"{exc.why}; the run counts as not evaluated on MMLU"
    col.runs.append(Run(d, summary, mmlu, _read_config(run)))
