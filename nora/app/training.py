"""One training run from a composed config: what ``train.py`` calls (:func:`run_training`).

compose -> build model -> apply method -> build data -> train -> evaluate -> write the run outputs:

=====================  =========================================================================
config.yaml            the resolved config
metrics.jsonl          step/epoch loss, lr, throughput, data-wait share; eval metrics
summary.json           method, model, dataset, seed, parameters (trainable/total, per component),
                       best and final eval metrics, wall time, throughput, peak memory, hardware
adapter/               what the method trained: peft files (LoRA/DoRA), NoRA files, or
                       ``trainable.safetensors`` (full fine-tuning, linear probe)
activations.png        learned activation curves per layer vs the original (rational methods)
checkpoints/last.pt    the latest checkpoint (atomic), used by ``resume``
=====================  =========================================================================
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from nora import hardware
from nora.adapter.curves import activation_figure
from nora.app.adapters import adapter_identity, adapter_mismatch, adapter_record, save_adapter
from nora.app.config import RunConfig, validate
from nora.app.setup import TrainSetup, build_setup
from nora.errors import UserError
from nora.eval.agreement import init_agreement, nora_target_modules
from nora.hardware import resolve_device, seed_everything
from nora.hub import go_offline_if_unreachable
from nora.methods import MethodResult, apply_method
from nora.models.config import get_family
from nora.runs.identity import changed_config, config_hash, kept_config, result_config
from nora.runs.layout import (
    RunDir,
    checkpoint_path,
    escape_interpolations,
    is_complete,
    read_stored_config,
    read_summary,
    write_config,
    write_summary,
)
from nora.runs.lock import RunLock
from nora.runs.logger import RunLogger, recorded_run_id
from nora.runs.writable import write_hydra_record
from nora.train import distributed as dist
from nora.train.loop import Trainer
from nora.train.signals import SetupGuard, stop_on_signals

log = logging.getLogger(__name__)


def default_run_dir(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path(cfg.output_root) / cfg.run_name


def _start_afresh_for_changed_config(cfg: DictConfig, run_dir: Path, what: str, policy: str) -> bool:
    """Before skipping a complete run or resuming a checkpoint: the run directory must hold this same
    configuration (a changed lr, epoch count or dataset must not silently keep or extend another run).
    ``on_config_change``: error (default), rerun (start afresh), keep (use what is there). True: start afresh."""
    diff = changed_config(cfg, run_dir)
    if not diff:
        return False
    shown = "\n  ".join(diff[:20]) + (f"\n  ... and {len(diff) - 20} more" if len(diff) > 20 else "")
    if policy == "keep":
        log.warning(
            f"{run_dir} holds {what} of another configuration; on_config_change=keep uses it as it is:\n  {shown}"
        )
        return False
    if policy == "rerun":
        log.info(
            f"{run_dir} holds {what} of another configuration; on_config_change=rerun starts it afresh:\n  {shown}"
        )
        return True
    raise UserError(
        f"{run_dir} holds {what} of another configuration (then -> now):\n  {shown}\n"
        "on_config_change=rerun starts it afresh, on_config_change=keep uses it as it is; "
        "or choose another output_root"
    )


def resume_path(resume, run_dir: Path) -> Path | None:
    if resume in (None, False, "none", "null", "false"):
        return None
    if resume == "auto":
        p = checkpoint_path(run_dir)
        return p if p.exists() else None
    p = Path(str(resume))
    if p.is_dir():
        p = checkpoint_path(p)
    if not p.exists():
        raise UserError(f"resume={resume}: no checkpoint at {p}")
    return p


def run_training(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> dict:
    """Train one configuration and write its run directory; returns the summary.

    A run directory that already holds a complete ``summary.json`` is skipped (unless ``force``);
    one that holds a checkpoint is resumed (``resume=auto``).
    """
    with SetupGuard() as guard:  # SIGTERM before training starts: one line (nora.train.signals)
        run = validate(cfg)  # every value checked before anything is loaded
        go_offline_if_unreachable()
        run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
        with RunLock(run_dir):  # one process per run directory, for the whole run (nora.runs.lock)
            write_hydra_record(cfg, run_dir)  # .hydra/ only now: a process the lock refuses must not rewrite it
            stale = RunDir(run_dir).remove_stale_temps()
            if stale:
                log.info(
                    f"removed {len(stale)} temp file(s) left in {run_dir} by an interrupted write: "
                    f"{', '.join(str(p.relative_to(run_dir)) for p in stale)}"
                )
            return _train(run, run_dir, guard)


def _train(run: RunConfig, run_dir: Path, guard: SetupGuard) -> dict:
    """:func:`run_training` once it holds ``run_dir``."""
    done, resume_from = _skip_or_resume(run, run_dir)
    if done is not None:
        return done
    if run.on_config_change == "keep" and run.resume == "auto" and resume_from is not None:
        run = validate(kept_config(run.composed, run_dir))  # config.yaml and the hash record what the run uses

    device = resolve_device(run.trainer.device)
    if dist.setup(device.type) and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank())
    ws, rk = dist.world_size(), dist.rank()
    say = log.info if rk == 0 else (lambda *a, **k: None)
    continues_here = resume_from is not None and resume_from.resolve() == checkpoint_path(run_dir).resolve()
    if not continues_here and rk == 0:  # a fresh start (or one from another run's checkpoint): nothing of an
        RunDir(run_dir).clear_outputs()  # earlier attempt in this directory may leak into this run
    seed_everything(run.seed)
    setup = build_setup(run, device, ws, rk)
    model = setup.model.to(device)
    originals = nora_target_modules(model, run.method.nora.nora_config(None)) if setup.agreement_batches else {}
    result: MethodResult = apply_method(model, run.method, run.model, setup.calibration, setup.forward)
    model = result.model
    say(f"{run.method.name} on {run.model.name}/{run.dataset.name}: {result.parameters}")
    if originals:  # an evaluation of NoRA's initialisation, before any wrapping or training
        setup.extra["nora_init_agreement"] = init_agreement(
            model, originals, setup.agreement_batches, device, setup.agreement_split, say
        )

    if rk == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, run.composed)  # resolved; a literal ${...} value escaped, so it reads back as written
    logger = RunLogger(
        run_dir,
        run.logger,
        config=OmegaConf.to_container(run.composed, resolve=True),
        run_name=run.run_name,
        enabled=rk == 0,
        resume=resume_from is not None,
    )
    trainer = Trainer(
        run.trainer,
        model,
        setup.task,
        setup.data,
        checkpoint_path(run_dir),
        logger,
        head=setup.head,
        seed=run.seed,
        device=device,
        wrap=setup.wrap,
    )
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
        say(f"resumed from {resume_from} at step {trainer.state.step} (epoch {trainer.state.epoch})")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    memory_before_mb = (
        torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else hardware.current_rss_mb()
    )
    guard.release()  # from here on a stop signal checkpoints and stops (stop_on_signals)
    with logger.failing_on_error():  # W&B: a crash closes the run as failed; success finishes it below
        with stop_on_signals(trainer):  # SIGTERM: checkpoint and stop; Ctrl-C: one line (nora.train.signals)
            state = trainer.fit()
    if not state.finished:
        logger.finish(0)
        say(f"stopped at step {state.step}/{trainer.total_steps}; run the same command to resume")
        return {"status": "incomplete", "step": state.step}

    dist.gather_trainable(model)  # FSDP: every rank gathers the trained shards before rank 0 saves them
    summary = _summary(run, setup, result, trainer, device, memory_before_mb)
    if rk == 0:
        _write_outputs(run, model, result, run_dir, summary)
    shown = {k: v for k, v in summary.items() if k != "result_config"}  # config.yaml is W&B's config already
    logger.finish(0, summary=shown, images={"activations": RunDir(run_dir).activations})  # W&B: summary first
    dist.barrier()
    return summary


def _skip_or_resume(run: RunConfig, run_dir: Path) -> tuple[dict | None, Path | None]:
    """``(summary, None)`` for a complete run to skip, else ``(None, the checkpoint to resume or None)``. A run whose
    adapter is not the one it saved (``adapter/`` deleted, files replaced) is not complete: it is trained again,
    from its last checkpoint when there is one (which then only writes the outputs again)."""
    complete, auto = is_complete(run_dir), run.resume == "auto"
    afresh = run.force
    if not afresh and (complete or (auto and checkpoint_path(run_dir).exists())):
        what = "a complete run" if complete else "a checkpoint"
        afresh = _start_afresh_for_changed_config(run.composed, run_dir, what, run.on_config_change)
    if complete and not afresh:
        why = _adapter_problem(run, run_dir)
        if why is None:
            log.info(f"skip: {run_dir} already holds a complete summary.json (force=true reruns it)")
            return read_summary(run_dir), None
        again = " from its last checkpoint" if auto and checkpoint_path(run_dir).exists() else ""
        log.warning(f"{run_dir}: summary.json says complete but {why}; training the run again{again}")
    resume_from = resume_path(run.resume, run_dir)
    if resume_from is not None and not (afresh and auto):
        _check_foreign_checkpoint(run, run_dir, resume_from)
        if run.logger.wandb_enabled:
            recorded_run_id(run_dir)  # the W&B run it continues: a damaged wandb/run_id is one line, now
    return None, (None if afresh and auto else resume_from)


def _check_foreign_checkpoint(run: RunConfig, run_dir: Path, checkpoint: Path) -> None:
    """``resume=<another run>``: a checkpoint of another method or model cannot be loaded into this run's model;
    refused by the config that run recorded, before anything is built (the load refuses what this misses)."""
    other = checkpoint.resolve().parent.parent  # <run>/checkpoints/last.pt
    if other == run_dir.resolve():
        return
    stored = read_stored_config(other) or {}
    then = {k: (stored.get(k) or {}).get("name") for k in ("method", "model")}
    now = {"method": run.method.name, "model": run.model.name}
    differ = [f"{k}={then[k]}" for k in then if then[k] is not None and then[k] != now[k]]
    if differ:
        raise UserError(
            f"resume={run.resume}: {checkpoint} was written by a run of {', '.join(differ)} "
            f"({RunDir(other).config}), this run is {', '.join(f'{k}={now[k]}' for k in now)}: its "
            "tensors do not fit this model; resume from a run of this method and model, or resume=null"
        )


def _adapter_problem(run: RunConfig, run_dir: Path) -> str | None:
    """Why the adapter of the complete run in ``run_dir`` is not the one it saved (deleted, incomplete, another
    kind, other files), or None: such a run is not complete."""
    adir = RunDir(run_dir).adapter
    if not adir.is_dir():
        return f"{adir} is missing"
    try:
        identity = adapter_identity(adir)
    except UserError as exc:
        return str(exc)
    return adapter_mismatch(identity, run.method, (read_summary(run_dir) or {}).get("adapter"))


def _summary(
    run: RunConfig, setup: TrainSetup, result: MethodResult, trainer: Trainer, device, memory_before_mb: float
) -> dict:
    state, task = trainer.state, setup.task
    summary = {
        "status": "complete",
        "run_name": run.run_name,
        "method": run.method.name,
        "model": run.model.name,
        "dataset": run.dataset.name,
        "family": run.family,
        "seed": run.seed,
        "config_hash": config_hash(run.composed),
        "result_config": escape_interpolations(result_config(run.composed)),  # what eval checks config.yaml against
        "parameters": result.parameters.to_dict(),
        "metric": task.metric,
        "final": state.last_eval,
        "best": {"value": state.best, "step": state.best_step},
        "steps": state.step,
        "epochs": state.epoch,
        f"{task.unit}_seen": state.units,
        f"{task.unit}_per_s": state.units / state.train_time if state.train_time else None,
        "data_wait_share": state.data_time / state.train_time if state.train_time else None,
        "wall_time_s": state.wall_time,
        "train_time_s": state.train_time,
        "peak_memory_mb": hardware.peak_memory_mb(device),
        "memory_before_training_mb": memory_before_mb,
        "device": str(device),
        "world_size": dist.world_size(),
        "hardware": hardware.describe(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if get_family(run.family).classifier:
        summary["final_accuracy"] = state.last_eval.get("accuracy")
        summary["best_accuracy"] = state.best
    if result.injection is not None:
        summary["nora_fit_max_error"] = result.injection.max_error()
    summary.update(setup.extra)
    return summary


def _write_outputs(run: RunConfig, model, result: MethodResult, run_dir: Path, summary: dict) -> None:
    save_adapter(model, run.method, RunDir(run_dir).adapter)
    summary["adapter"] = adapter_record(adapter_identity(RunDir(run_dir).adapter))  # what a reload checks
    if result.injection is not None:
        activation_figure(
            RunDir(run_dir).adapter,
            RunDir(run_dir).activations,  # drawn from the files just saved
            title=f"{run.method.name} on {run.dataset.name} (seed {run.seed})",
        )
    write_summary(run_dir, summary)
