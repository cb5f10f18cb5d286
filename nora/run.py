"""One training run from a composed config: what ``train.py`` calls.

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
import random
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from nora import hardware
from nora.config import config_differences, config_hash, per_family, validate
from nora.errors import UserError
from nora.hub import go_offline_if_unreachable
from nora.methods import MethodResult, apply_method
from nora.train import distributed as dist
from nora.run_dir import (RunDir, checkpoint_path, is_complete, kept_config, read_stored_config, read_summary,
                          write_config, write_summary)
from nora.run_lock import RunLock
from nora.train.signals import stop_on_signals
from nora.train.logger import RunLogger
from nora.train.loop import Trainer, resolve_device

log = logging.getLogger("nora")

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_run_dir(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path(cfg.output_root) / cfg.run_name


def changed_config(cfg, run_dir: str | os.PathLike) -> list[str]:
    """How ``cfg`` differs from the config the run in ``run_dir`` was started with, in what determines the
    result (``key: then -> now``); empty if the same or if nothing was recorded."""
    stored = read_stored_config(run_dir)
    return config_differences(stored, cfg) if stored is not None else []


def _start_afresh_for_changed_config(cfg: DictConfig, run_dir: Path, what: str) -> bool:
    """Before skipping a complete run or resuming a checkpoint: the run directory must hold this same
    configuration (a changed lr, epoch count or dataset must not silently keep or extend another run).
    ``on_config_change``: error (default), rerun (start afresh), keep (use what is there). True: start afresh."""
    diff = changed_config(cfg, run_dir)
    if not diff:
        return False
    shown = "\n  ".join(diff[:20]) + (f"\n  ... and {len(diff) - 20} more" if len(diff) > 20 else "")
    policy = cfg.get("on_config_change", "error")
    if policy == "keep":
        print(f"warning: {run_dir} holds {what} of another configuration; on_config_change=keep uses it as it is:"
              f"\n  {shown}")
        return False
    if policy == "rerun":
        print(f"{run_dir} holds {what} of another configuration; on_config_change=rerun starts it afresh:\n  {shown}")
        return True
    raise UserError(f"{run_dir} holds {what} of another configuration (then -> now):\n  {shown}\n"
                    "on_config_change=rerun starts it afresh, on_config_change=keep uses it as it is; "
                    "or choose another output_root")


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


# ------------------------------------------------------------------------------------ vision
def _vision_setup(cfg: DictConfig, device, ws: int, rk: int):
    from nora.data.sampling import ShuffledBatchSampler
    from nora.data.vision import build_vision_data, load_vision_dataset
    from nora.models import build_model
    from nora.models.vision import input_size, pretrained_cfg
    from nora.train.tasks import ClassificationTask

    raw = load_vision_dataset(cfg.dataset)  # missing data fails before any model download
    model = build_model(cfg.model, int(cfg.dataset.num_classes))
    pcfg, size = pretrained_cfg(model), input_size(model)
    bs = int(cfg.trainer.batch_size)
    train_sampler = ShuffledBatchSampler(len(raw[0]), bs, seed=int(cfg.seed), num_replicas=ws, rank=rk)
    eval_sampler = ShuffledBatchSampler(len(raw[1]), int(cfg.trainer.eval_batch_size), shuffle=False,
                                        drop_last=False, num_replicas=ws, rank=rk)
    calib_sampler = ShuffledBatchSampler(len(raw[0]), bs, seed=int(cfg.seed) + 1, drop_last=False)
    n_calib = int(cfg.method.nora.get("calibration_batches", 4)) if cfg.method.get("nora") else 0
    wants_calibration = bool(cfg.method.get("nora")) and cfg.method.nora.init == "calibrated"
    parts = dict(model=model, task=ClassificationTask(), collate_fn=None, forward=None, calibration=None,
                 head=cfg.model.get("head") or "head", extra={}, train_sampler=train_sampler,
                 eval_sampler=eval_sampler)
    path = data_path(cfg.trainer.get("data_path", "auto"), device)
    parts["extra"].update(data_path=path, image_size=size)
    if path == "batched":
        from nora.data.batched import BatchedAugment, DeviceBatches, as_uint8_tensors

        aug = cfg.dataset.get("augment") or {}
        mean, std, interp = pcfg.get("mean", (0.5,) * 3), pcfg.get("std", (0.5,) * 3), pcfg.get("interpolation")
        train_aug = BatchedAugment(size, mean, std, interp, True, bool(aug.get("hflip", True)),
                                   int(aug.get("crop_padding", 0)))
        eval_aug = BatchedAugment(size, mean, std, interp, train=False)
        tensors = {"train": [t.to(device) for t in as_uint8_tensors(raw[0])],
                   "eval": [t.to(device) for t in as_uint8_tensors(raw[1])]}

        def loader(dataset, sampler, epoch, train):
            key = dataset  # "train" or "eval"
            return DeviceBatches(*tensors[key], sampler, train_aug if train else eval_aug, int(cfg.seed), epoch)

        parts.update(train_set="train", eval_set="eval", loader_factory=loader)
        if wants_calibration:
            calibration = DeviceBatches(*tensors["train"], calib_sampler, eval_aug, int(cfg.seed), 0)
            parts["calibration"] = [x for _, (x, _y) in zip(range(n_calib), calibration)]
    else:
        data = build_vision_data(cfg.dataset, pcfg, size, int(cfg.seed), raw=raw)
        parts.update(train_set=data.train, eval_set=data.eval)
        if wants_calibration:
            loader = torch.utils.data.DataLoader(data.calibration, batch_sampler=calib_sampler)
            parts["calibration"] = [x.to(device) for _, (x, _y) in zip(range(n_calib), loader)]
    return parts


DATA_PATHS = ("auto", "batched", "per_sample")


def data_path(name: str, device: torch.device) -> str:
    """``batched`` (device-resident uint8 images, batched augmentation) or ``per_sample`` (torchvision
    transforms in DataLoader workers); ``auto`` takes ``batched`` on CUDA and ``per_sample`` elsewhere."""
    if name not in DATA_PATHS:
        raise UserError(f"unknown trainer.data_path {name!r}; valid: {', '.join(DATA_PATHS)}")
    if name == "auto":
        return "batched" if device.type == "cuda" else "per_sample"
    return name


# ----------------------------------------------------------------------------------- outputs
def save_adapter(model, method_cfg, directory: Path) -> None:
    """Write what the method trained (see the module docstring)."""
    import nora
    from nora.adapter.inject import is_peft_model

    directory.mkdir(parents=True, exist_ok=True)
    if is_peft_model(model):
        model.save_pretrained(str(directory))
    if nora.nora_modules(model):
        nora.save_nora(model, directory)
    if not method_cfg.lora and not method_cfg.nora:
        from safetensors.torch import save_file

        state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        from nora.files import atomic_write

        atomic_write(directory / "trainable.safetensors", lambda tmp: save_file(state, str(tmp)))


def run_training(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> dict:
    """Train one configuration and write its run directory; returns the summary.

    A run directory that already holds a complete ``summary.json`` is skipped (unless ``force``);
    one that holds a checkpoint is resumed (``resume=auto``).
    """
    validate(cfg)
    go_offline_if_unreachable()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    with RunLock(run_dir):  # one process per run directory, for the whole run (nora.run_lock)
        return _train(cfg, run_dir)


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    """:func:`run_training` once it holds ``run_dir``."""
    complete, auto = is_complete(run_dir), cfg.get("resume", "auto") == "auto"
    afresh = bool(cfg.get("force", False))
    if not afresh and (complete or (auto and checkpoint_path(run_dir).exists())):
        afresh = _start_afresh_for_changed_config(cfg, run_dir, "a complete run" if complete else "a checkpoint")
    if complete and not afresh:
        log.info("%s is complete (summary.json); skipping (force=true reruns it)", run_dir)
        print(f"skip: {run_dir} already holds a complete summary.json (force=true reruns it)")
        return read_summary(run_dir)
    if auto and not afresh and cfg.get("on_config_change") == "keep" and checkpoint_path(run_dir).exists():
        cfg = kept_config(cfg, run_dir)  # config.yaml and the hash record what the resumed run uses
    resume_from = resume_path(cfg.get("resume", "auto"), run_dir)
    if afresh and auto:
        resume_from = None

    device = resolve_device(cfg.trainer.device)
    if dist.setup(device.type) and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank())
    ws, rk = dist.world_size(), dist.rank()
    say = print if rk == 0 else (lambda *a, **k: None)
    continues_here = resume_from is not None and resume_from.resolve() == checkpoint_path(run_dir).resolve()
    if not continues_here and rk == 0:  # a fresh start (or one from another run's checkpoint): nothing of an
        RunDir(run_dir).clear_outputs()  # earlier attempt in this directory may leak into this run
    seed_everything(int(cfg.seed))
    family = cfg.model.family
    if family == "vision":
        parts = _vision_setup(cfg, device, ws, rk)
    else:
        from nora.llm import causal_lm_setup

        parts = causal_lm_setup(cfg, device, ws, rk)
    model = parts["model"].to(device)
    result: MethodResult = apply_method(model, cfg.method, cfg.model, parts["calibration"], parts["forward"])
    model = result.model
    say(f"{cfg.method.name} on {cfg.model.name}/{cfg.dataset.name}: {result.parameters}")

    resolved = OmegaConf.to_container(cfg, resolve=True)
    if rk == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, OmegaConf.to_yaml(cfg, resolve=True))
    logger = RunLogger(run_dir, cfg.logger, config=resolved, run_name=cfg.run_name, enabled=rk == 0,
                       resume=resume_from is not None)
    tcfg = cfg.trainer
    lr = tcfg.lr if tcfg.lr is not None else per_family(cfg.method.lr, family, "method.lr")
    head_lr = tcfg.head_lr if tcfg.head_lr is not None else per_family(cfg.method.head_lr, family, "method.head_lr")
    nora_lr = tcfg.nora_lr if tcfg.nora_lr is not None else per_family(cfg.method.nora_lr, family, "method.nora_lr")
    wd = tcfg.weight_decay if tcfg.weight_decay is not None else cfg.method.weight_decay
    wrap = parts.get("wrap") or ((lambda m: dist.wrap_ddp(m, device)) if ws > 1 else None)
    trainer = Trainer(tcfg, model, parts["task"], parts["train_set"], parts["eval_set"], parts["train_sampler"],
                      parts["eval_sampler"], run_dir, logger, lr=float(lr),
                      head_lr=float(head_lr) if head_lr is not None else None,
                      nora_lr=float(nora_lr) if nora_lr is not None else None, weight_decay=float(wd),
                      head=parts["head"] if family == "vision" else None, collate_fn=parts["collate_fn"],
                      seed=int(cfg.seed), device=device, wrap=wrap, loader_factory=parts.get("loader_factory"))
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
        say(f"resumed from {resume_from} at step {trainer.state.step} (epoch {trainer.state.epoch})")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    memory_before_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else hardware.current_rss_mb()
    with logger.failing_on_error():  # W&B: a crash closes the run as failed; success finishes it below
        with stop_on_signals(trainer):  # SIGTERM: checkpoint and stop; Ctrl-C: one line (nora.train.signals)
            state = trainer.fit()
    if not state.finished:
        logger.finish(0)
        say(f"stopped at step {state.step}/{trainer.total_steps}; run the same command to resume")
        return {"status": "incomplete", "step": state.step}

    dist.gather_trainable(model)  # FSDP: every rank gathers the trained shards before rank 0 saves them
    summary = {
        "status": "complete",
        "run_name": cfg.run_name, "method": cfg.method.name, "model": cfg.model.name, "dataset": cfg.dataset.name,
        "family": family, "seed": int(cfg.seed), "config_hash": config_hash(cfg),
        "parameters": result.parameters.to_dict(),
        "metric": parts["task"].metric, "final": state.last_eval, "best": {"value": state.best, "step": state.best_step},
        "steps": state.step, "epochs": state.epoch, f"{parts['task'].unit}_seen": state.units,
        f"{parts['task'].unit}_per_s": state.units / state.train_time if state.train_time else None,
        "data_wait_share": state.data_time / state.train_time if state.train_time else None,
        "wall_time_s": state.wall_time, "train_time_s": state.train_time,
        "peak_memory_mb": hardware.peak_memory_mb(device), "memory_before_training_mb": memory_before_mb,
        "device": str(device), "world_size": ws,
        "hardware": hardware.describe(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if family == "vision":
        summary["final_accuracy"] = state.last_eval.get("accuracy")
        summary["best_accuracy"] = state.best
    if result.injection is not None:
        summary["nora_fit_max_error"] = result.injection.max_error()
    summary.update(parts.get("extra") or {})
    if rk == 0:
        save_adapter(model, cfg.method, RunDir(run_dir).adapter)
        if result.injection is not None:
            from nora.results.figures import activation_figure

            activation_figure(run_dir, RunDir(run_dir).activations,  # drawn from the adapter files just saved
                              title=f"{cfg.method.name} on {cfg.dataset.name} (seed {cfg.seed})")
        write_summary(run_dir, summary)
    logger.finish(0, summary=summary, images={"activations": RunDir(run_dir).activations})  # W&B: summary first
    dist.barrier()
    return summary
