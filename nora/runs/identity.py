"""What identifies a run's result: the part of its config that decides what it computes (:func:`result_config`),
a short hash of it (:func:`config_hash`), and how two configs differ in it (:func:`config_differences`,
:func:`changed_config` against a run directory's ``config.yaml``). Everything else (where a run writes, how it is
logged or shown, whether it is skipped or resumed) never makes a run directory "another configuration"."""

from __future__ import annotations

import hashlib
import json
import os

from omegaconf import DictConfig, OmegaConf

from nora.runs.layout import RunDir, escape_interpolations, read_stored_config, read_summary

# What decides where a run is written, how it is logged or shown, or whether it is skipped or resumed: not
# its result. Changing these never makes a run directory "another configuration".
NOT_RESULT_KEYS = ("resume", "force", "on_config_change", "output_root", "logger", "run_name", "hydra")
# strategy: DDP and FSDP take the same steps (tests/test_distributed.py), and a checkpoint resumes under either
NOT_RESULT_TRAINER_KEYS = ("progress", "num_workers", "log_every", "checkpoint_every", "stop_after_steps", "strategy")


def result_config(cfg) -> dict:
    """The resolved part of a config (DictConfig or plain dict) that determines a run's result. A job
    composed with its ``hydra`` node works too: that node (which resolves only inside a Hydra run) is
    dropped before anything is resolved."""
    d = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    d.pop("hydra", None)
    d = OmegaConf.to_container(OmegaConf.create(d), resolve=True)
    for k in NOT_RESULT_KEYS:
        d.pop(k, None)
    if isinstance(d.get("trainer"), dict):
        for k in NOT_RESULT_TRAINER_KEYS:
            d["trainer"].pop(k, None)
    return d


def config_hash(cfg) -> str:
    """A short, stable hash of what determines a run's result (not where it is written or logged)."""
    return hashlib.sha256(json.dumps(result_config(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def config_differences(before, after) -> list[str]:
    """``key: before -> after`` for every result-determining value that differs between two configs."""
    a, b = _flatten(result_config(before)), _flatten(result_config(after))
    missing = "(not set)"
    return [
        f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}".replace(f"'{missing}'", missing)
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def changed_config(cfg, run_dir: str | os.PathLike) -> list[str]:
    """How ``cfg`` differs from the config the run in ``run_dir`` was started with, in what determines the
    result (``key: then -> now``); empty if the same or if nothing was recorded."""
    stored = read_stored_config(run_dir)
    return config_differences(stored, cfg) if stored is not None else []


def kept_config(cfg, run_dir: str | os.PathLike):
    """``on_config_change=keep`` resuming a checkpoint of another configuration: the run continues as the
    configuration it was started with (the checkpoint's optimizer, schedule and step count are that run's), so
    that is the config it records. Only what does not determine the result (where it is written, logging,
    progress, ``stop_after_steps``...: :data:`NOT_RESULT_KEYS`) is taken from ``cfg``."""
    stored = read_stored_config(run_dir)
    if stored is None:
        return cfg
    now = escape_interpolations(OmegaConf.to_container(cfg, resolve=True))  # stored is escaped: so must these be
    for key in NOT_RESULT_KEYS:
        if key in now:
            stored[key] = now[key]
    for key in NOT_RESULT_TRAINER_KEYS:
        if key in now.get("trainer", {}):
            stored.setdefault("trainer", {})[key] = now["trainer"][key]
    return OmegaConf.create(stored)


def edited_config(run_dir: str | os.PathLike) -> str | None:
    """Why ``<run_dir>/config.yaml`` is not the config the run trained with, or None: its :func:`config_hash`
    differs from the one ``summary.json`` records (the file was edited after training, e.g. ``model.init_seed``:
    every reader would rebuild another base model). The message names the keys that differ when ``summary.json``'s
    ``result_config`` or the run's ``.hydra/config.yaml`` (written when train.py started it) still hashes to the
    recorded value, else the two hashes. None when nothing was recorded (a run from before ``config_hash``, or an
    incomplete one)."""
    rd = RunDir(run_dir)
    recorded = (read_summary(run_dir) or {}).get("config_hash")
    stored = read_stored_config(run_dir)
    if not recorded or stored is None:
        return None
    try:
        now = config_hash(stored)
    except Exception as exc:  # noqa: BLE001  an interpolation an edit put there that does not resolve
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{rd.config} is not the config this run trained with (it does not resolve: {first})"
    if now == recorded:
        return None
    diff = _differences_from_start(rd, recorded, stored)
    shown = "; ".join(diff[:6]) + (f"; ... and {len(diff) - 6} more" if len(diff) > 6 else "")
    what = f"edited after training: {shown}" if diff else f"its config_hash is {now}, summary.json records {recorded}"
    return f"{rd.config} is not the config this run trained with ({what})"


def _differences_from_start(rd: RunDir, recorded: str, stored: dict) -> list[str]:
    """``key: then -> now`` between the config the run trained with and ``stored``: ``summary.json``'s
    ``result_config`` (runs since it is recorded), else ``.hydra/config.yaml`` (written when train.py started the
    run) when it still hashes to ``recorded``; empty when neither tells."""
    started = (read_summary(rd.root) or {}).get("result_config")
    try:
        if not isinstance(started, dict) and rd.hydra_config.is_file():
            started = OmegaConf.to_container(OmegaConf.load(rd.hydra_config), resolve=False)
            started.pop("run_name", None)  # ${run_overrides:} resolves only where nora.runs.naming registered it
        if not isinstance(started, dict) or config_hash(started) != recorded:
            return []
        return config_differences(started, stored)
    except Exception:  # noqa: BLE001  unreadable or unresolvable here: the hashes alone are reported
        return []
