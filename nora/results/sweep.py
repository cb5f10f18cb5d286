"""Sweeps (``sweeps/*.yaml``): expand a sweep into its jobs, say which are done, print the plan.

A sweep file is a primary Hydra config that includes ``train`` and lists its axes in
``hydra.sweeper.params``; it is launched with ``train.py``'s multirun::

    python train.py -m --config-dir sweeps --config-name table1 [overrides]

Every job's directory is ``${output_root}/${run_name}`` (``hydra.sweep.dir``/``hydra.sweep.subdir`` in
``configs/train.yaml``; the name carries the job's result-changing value overrides, :mod:`nora.runs.naming`), derived
from the job's config and not from the launch time, so re-running a sweep skips
the jobs whose ``summary.json`` is complete and resumes interrupted ones from ``checkpoints/last.pt``
(``nora.app.training.run_training``). :class:`SweepPlanCallback` (included by every sweep through
``sweeps/common/sweep_plan.yaml``) prints the number of jobs, their state and an estimate of the device time
they will take (from the training throughput measured by ``python -m nora.bench train`` on this kind of device,
``results/bench_train_<device>.json``) before anything runs, and stops there when
``hydra.callbacks.sweep_plan.dry_run=true`` (or ``NORA_SWEEP_DRY_RUN=1``).

``python -m nora.results plan <sweep> [overrides]`` prints the same plan through Hydra's compose API.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from nora.app.config import CONFIG_DIR
from nora.errors import UserError
from nora.runs.identity import changed_config
from nora.runs.layout import checkpoint_path, is_complete

SWEEP_DIR = CONFIG_DIR.parent / "sweeps"

# Every sweep file, grouped by the result it produces (what `make table1|table2|ablations` run).
SWEEPS = {
    "table1": ["table1", "table1_low_budget"],
    "table2": ["table2"],
    "ablations": [
        "ablation_variant",
        "ablation_rank",
        "ablation_groups",
        "ablation_form",
        "ablation_numerator",
        "ablation_init",
        "ablation_residual",
    ],
    "matched_budget": ["matched_vit", "matched_llama"],
}


def all_sweeps() -> list[str]:
    return [s for group in SWEEPS.values() for s in group]


def sweep_names(name: str) -> list[str]:
    """The sweep files of ``name`` (a group of :data:`SWEEPS`, or one ``sweeps/<name>.yaml``); a name that is
    neither is a :class:`UserError` listing the valid ones."""
    if name in SWEEPS:
        return SWEEPS[name]
    if (SWEEP_DIR / f"{name}.yaml").is_file():
        return [name]
    files = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))
    raise UserError(
        f"unknown sweep {name!r}; valid: {', '.join(SWEEPS)} (groups) or {', '.join(files)} (sweeps/*.yaml)"
    )


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def override_error(
    exc: BaseException, overrides: Sequence[str], compose_fn: Callable[[list[str]], object] | None = None
) -> UserError | None:
    """Hydra's error for a bad command-line override as one line naming the override and what is valid (None
    when ``exc`` is not such an error): an unknown config-group option lists the group's options, an unknown key
    the keys of its section (``compose_fn(overrides)`` composes the config without the bad override), a line that
    does not parse says so."""
    from hydra.errors import HydraException

    if not isinstance(exc, HydraException):
        return None
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("See https://")]
    first = lines[0] if lines else type(exc).__name__
    if "Available options in" in str(exc):  # MissingConfigException: an unknown option of a config group
        options = [ln.strip() for ln in str(exc).split("Available options in", 1)[1].splitlines()[1:]]
        options = [o for o in options[: next((i for i, o in enumerate(options) if not o or ":" in o), None)]]
        missing = re.search(r"Could not find '(.+)/([^/']+)'", first)
        what = (
            f"{missing[1].replace('/', '.')}={missing[2]}: no such option of {missing[1]}"
            if missing
            else first.split(": ", 1)[-1]
        )
        return UserError(f"{what}; valid: {', '.join(options)}")
    if first.startswith("Could not override '"):
        key = first.split("'")[1]
        bad = next((o for o in overrides if _override_key(o) == key), key)
        where = valid_keys(key, [o for o in overrides if _override_key(o) != key], compose_fn)
        return UserError(f"{bad}: no such key{where}")
    if type(exc).__name__ == "OverrideParseException":
        return UserError(
            f"cannot parse the override(s) {' '.join(overrides)}: {'; '.join(lines[:2])} (the form is "
            "key=value, e.g. trainer.lr=0.01)"
        )
    return UserError("; ".join(lines[:2]))


def valid_keys(key: str, overrides: Sequence[str], compose_fn) -> str:
    """``; valid keys of <section>: a, b, ...`` for the deepest section of ``key`` that exists in
    ``compose_fn(overrides)`` (empty when it cannot be composed)."""
    from omegaconf import DictConfig

    if compose_fn is None:
        return ""
    try:
        node = compose_fn(list(overrides))
        seen: list[str] = []
        for part in key.split(".")[:-1]:
            if not isinstance(node, DictConfig) or part not in node:
                break
            node, seen = node._get_node(part), seen + [part]
    except Exception:  # noqa: BLE001  what the other overrides do wrong is reported when they are used
        return ""
    section = ".".join(seen) or "the top level"
    if hasattr(node, "_is_none") and node._is_none():
        return f" ({section} is null in this config)"
    if not isinstance(node, DictConfig):
        return f" ({section} is a value, not a section)"
    keys = [k for k in node.keys() if k != "hydra"]
    return f"; valid keys of {section}: {', '.join(map(str, keys))}"


@dataclass
class Job:
    overrides: list[str]  # the job's own overrides (one value per swept key)
    run_dir: Path
    status: str  # complete | resumable | changed | started | new
    estimate_s: float | None = None  # device seconds to train it, from a measured throughput (None: unknown)

    def describe(self) -> str:
        cost = f"~{_fmt_time(self.estimate_s)}" if self.estimate_s is not None else "~?"
        return f"{self.status:9s} {cost:>8s} {self.run_dir}  [{' '.join(self.overrides)}]"


# Training-set sizes of the datasets whose size is known before loading them
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000}


def _fmt_time(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def load_throughput(device_type: str, results: Path | None = None) -> dict | None:
    """``results/bench_train_<device>.json`` (``python -m nora.bench train``), if it was measured."""
    import json

    path = (results or CONFIG_DIR.parent / "results") / f"bench_train_{device_type}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def estimate_seconds(cfg, bench: dict | None) -> float | None:
    """Device time of one training job: images it will see / images per second measured for its method on the
    same model (the benchmark's batch size may differ; evaluation time is left out). None when not measured."""
    if bench is None or bench.get("model") != cfg.model.name:  # the benchmark measured one (vision) model
        return None
    row = (bench.get("methods") or {}).get(cfg.method.name)
    n = cfg.dataset.get("limit_train") or TRAIN_IMAGES.get(cfg.dataset.name)
    if not row or not n or not row.get("images_per_s"):
        return None
    t = cfg.trainer
    per_step = int(t.batch_size) * int(t.grad_accum)
    steps = int(t.max_steps) if t.get("max_steps") else int(t.epochs) * (int(n) // per_step)
    return steps * per_step / float(row["images_per_s"])


def job_overrides(params: dict, task_overrides: Sequence[str], config_loader=None) -> list[list[str]]:
    """The override list of each job, exactly as Hydra's basic sweeper expands them (cartesian product of
    ``hydra.sweeper.params`` and the command line, the command line winning for a key given in both)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    merged = [f"{k}={v}" for k, v in params.items()] + list(task_overrides)
    parser = OverridesParser.create(config_loader=config_loader)
    final: "OrderedDict[str, list[str]]" = OrderedDict()
    for o in parser.parse_overrides(merged):
        key = o.get_key_element()
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise ValueError(f"{key}: only discrete sweeps (a,b,c) are supported by the basic sweeper")
            final[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            final[key] = [f"{key}={o.get_value_element_as_str()}"]
    return [list(x) for x in itertools.product(*final.values())]


def run_status(run_dir: Path, cfg=None) -> str:
    """complete | resumable | started | new; ``changed`` when a complete or resumable run directory was
    started with another configuration than the job's ``cfg`` (``on_config_change`` decides what train.py does)."""

    if is_complete(run_dir):
        status = "complete"
    elif checkpoint_path(run_dir).exists():
        status = "resumable"
    else:
        return "started" if run_dir.exists() else "new"
    if cfg is not None:
        with contextlib.suppress(Exception):
            if changed_config(cfg, run_dir):
                return "changed"
    return status


def job_run_dir(cfg) -> Path:
    """``hydra.sweep.dir/hydra.sweep.subdir`` of a composed job config (with its hydra node), which
    configs/train.yaml sets to ``${output_root}/${run_name}``."""
    from omegaconf import OmegaConf

    hydra = cfg.get("hydra")
    if hydra is not None:
        with contextlib.suppress(Exception):
            sweep = OmegaConf.to_container(hydra.sweep, resolve=True)
            return Path(str(sweep["dir"])) / str(sweep["subdir"])
    return Path(str(cfg.output_root)) / str(cfg.run_name)


def plan_jobs(
    compose_fn, config_name: str, params: dict, task_overrides: Sequence[str], config_loader=None
) -> list[Job]:
    """Compose every job of a sweep (nothing runs) and report its run directory and state."""
    import torch

    bench = load_throughput("cuda" if torch.cuda.is_available() else "cpu")
    jobs = []
    for ov in job_overrides(params, task_overrides, config_loader):
        cfg = compose_fn(config_name, ov)
        run_dir = job_run_dir(cfg)
        est = None
        with contextlib.suppress(Exception):
            est = estimate_seconds(cfg, bench)
        jobs.append(Job(ov, run_dir, run_status(run_dir, cfg), est))
    return jobs


class CachedComposer:
    """``compose_job`` for many jobs of one sweep: the defaults tree (the slow part) is composed once per
    combination of config-group choices; value overrides are then applied to a copy exactly as Hydra applies
    them (``ConfigLoaderImpl._apply_overrides_to_config``, after the defaults)."""

    def __init__(self) -> None:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.loader = GlobalHydra.instance().config_loader()
        self.parser = OverridesParser.create(config_loader=self.loader)
        self.cache: dict = {}

    def _is_group(self, o) -> bool:
        if o.is_delete() or o.package is not None:
            return True
        return self.loader.repository.group_exists(o.key_or_group)

    def __call__(self, config_name: str, overrides: Sequence[str]):
        import copy

        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from omegaconf import OmegaConf

        parsed = self.parser.parse_overrides(list(overrides))
        groups = tuple(o.input_line for o in parsed if self._is_group(o))
        values = [o for o in parsed if not self._is_group(o)]
        key = (config_name, groups)
        if key not in self.cache:
            self.cache[key] = compose_job(config_name, list(groups))
        cfg = copy.deepcopy(self.cache[key])
        OmegaConf.set_readonly(cfg, False)
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        # what Hydra records for the job (its run name carries the value overrides: nora/runs/naming.py)
        cfg.hydra.overrides.task = [o.input_line for o in parsed if not o.is_hydra_override()]
        return cfg


def format_plan(name: str, jobs: list[Job], verbose: bool = True) -> str:
    counts = {s: sum(j.status == s for j in jobs) for s in ("complete", "resumable", "changed", "started", "new")}
    dirs = [j.run_dir for j in jobs]
    dup = len(dirs) - len(set(dirs))
    head = (
        f"sweep {name}: {len(jobs)} job{'' if len(jobs) == 1 else 's'} ({counts['complete']} complete: skipped, "
        f"{counts['resumable']} "
        f"resumable from a checkpoint, {counts['started'] + counts['new']} to run)"
    )
    if counts["changed"]:
        head += (
            f"; {counts['changed']} run director{'y holds' if counts['changed'] == 1 else 'ies hold'} a run of "
            "another configuration: train.py stops there unless on_config_change=rerun (start afresh) or "
            "on_config_change=keep (use it as it is)"
        )
    if dup:
        head += f"; WARNING: {dup} jobs share a run directory with another job"
    todo = [j for j in jobs if j.status != "complete"]
    known = [j.estimate_s for j in todo if j.estimate_s is not None]
    if todo:
        cost = f"estimated device time for the {len(todo)} jobs to run: "
        cost += f"~{_fmt_time(sum(known))}" if known else "unknown"
        if len(known) < len(todo):
            cost += (
                f" ({len(todo) - len(known)} without an estimate: no `python -m nora.bench train` throughput "
                "measured for their model, method and device)"
            )
        else:
            cost += " (from the measured `python -m nora.bench train` throughput; evaluation not included)"
        head += "\n" + cost
    lines = [head]
    if verbose:
        lines += ["  " + j.describe() for j in jobs]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ compose API
@contextlib.contextmanager
def sweep_hydra(config_dir: Path = CONFIG_DIR, sweep_dir: Path = SWEEP_DIR):
    """Hydra initialised as ``train.py --config-dir sweeps`` does: ``configs/`` as the main config
    directory, ``sweeps/`` prepended on the command line. Restores the previous global state on exit."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import setup_globals
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    try:
        version.setbase("1.3")
        setup_globals()
        csp = create_config_search_path(str(Path(config_dir).resolve()))
        csp.prepend(
            provider="command-line",
            path=f"file://{Path(sweep_dir).resolve()}",
            anchor=SearchPathQuery(provider="schema"),
        )
        Hydra.create_main_hydra2(task_name="train", config_search_path=csp)
        yield GlobalHydra.instance()
    finally:
        restore_gh_from_backup(backup)


def compose_job(config_name: str, overrides: Sequence[str], multirun: bool = True):
    """One job's config (with its ``hydra`` node), as the sweeper would compose it."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    gh = GlobalHydra.instance()
    if multirun:  # compose() has no run-mode argument; go through the loader as the sweeper does
        return gh.config_loader().load_configuration(
            config_name=config_name, overrides=list(overrides), run_mode=RunMode.MULTIRUN
        )
    return compose(config_name, overrides=list(overrides), return_hydra_config=True)


def sweep_params(config_name: str, overrides: Sequence[str] = ()) -> dict:
    """``hydra.sweeper.params`` of a sweep file (inside :func:`sweep_hydra`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    cfg = compose_job(config_name, fixed)
    return OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=False) or {}


def compose_sweep(config_name: str, overrides: Sequence[str] = ()):
    """One job's config of ``sweeps/<config_name>.yaml`` with ``overrides`` (compose only)."""
    with sweep_hydra():
        return compose_job(config_name, list(overrides))


def plan(config_name: str, overrides: Sequence[str] = ()) -> list[Job]:
    """Every job of ``sweeps/<config_name>.yaml`` with command-line ``overrides`` (compose only)."""
    with sweep_hydra():
        params = sweep_params(config_name, overrides)
        return plan_jobs(CachedComposer(), config_name, params, overrides)


# ------------------------------------------------------------------------------ callback
try:
    from hydra.experimental.callback import Callback as _Callback
except Exception:  # pragma: no cover
    _Callback = object


class SweepPlanCallback(_Callback):
    """Prints a sweep's jobs before Hydra launches them; with ``dry_run`` stops right after."""

    def __init__(self, dry_run: bool = False, verbose: bool = True) -> None:
        self.dry_run = bool(dry_run)
        self.verbose = bool(verbose)

    def on_multirun_start(self, config, **kwargs) -> None:
        from omegaconf import OmegaConf

        name = kwargs.get("config_name") or "sweep"
        params = OmegaConf.to_container(config.hydra.sweeper.params, resolve=False) or {}
        task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
        jobs = plan_jobs(CachedComposer(), name, params, task)
        print(format_plan(name, jobs, self.verbose), flush=True)
        if self.dry_run:
            print("dry run: nothing launched", flush=True)
            raise SystemExit(0)
