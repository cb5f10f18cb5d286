"""The training loop: one for every method and model family.

Read it top to bottom like nanoGPT's: build the optimizer and schedule, then for each epoch iterate
micro-batches, accumulate gradients, step, log, checkpoint, evaluate. Everything that makes a run
continue exactly after an interruption lives in :class:`LoopState` and the checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from nora.adapter.inject import canonical_name, nora_modules
from nora.adapter.ranges import fit_range_check_pending
from nora.errors import NonFiniteLossError, UserError
from nora.hardware import resolve_device
from nora.schema import load
from nora.train import distributed as dist
from nora.train.checkpoint import (
    atomic_save,
    check_finite,
    gather_training_state,
    load_optimizer_state_dict,
    load_training_state_dict,
    read_checkpoint,
    rng_state,
    set_rng_state,
)
from nora.train.config import TrainerConfig
from nora.train.signals import ctrl_c_deferred, stop_requested
from nora.train.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    step: int = 0  # optimizer steps taken
    units: int = 0  # images / tokens trained on
    train_time: float = 0.0  # seconds inside training steps (all sessions)
    data_time: float = 0.0  # seconds waiting for batches (all sessions)
    wall_time: float = 0.0  # seconds of the whole run (all sessions)
    best: float | None = None
    best_step: int | None = None
    last_eval: dict = field(default_factory=dict)
    finished: bool = False
    # the loss summed since the last metrics line and its step count: a resumed run's next line averages the same
    # steps as its uninterrupted twin's (mean over ranks)
    log_loss_sum: float = 0.0
    log_steps: int = 0


@dataclass
class Session:
    """What this process accumulates next to the checkpointed :class:`LoopState` and never saves as it is: made
    from the state (:meth:`Trainer._new_session`) when the trainer is built and again when a checkpoint replaces
    the state, so the loop, its checkpoints and its log lines always find it."""

    loss_sum: torch.Tensor  # the loss summed since the last metrics line (on the device: no host sync per step)
    interval_steps: int  # the optimizer steps in that sum (a checkpoint stores both: LoopState.log_*)
    nonfinite: torch.Tensor  # device flag, set once any loss was NaN/Inf
    steps: int = 0  # optimizer steps taken in this process (trainer.stop_after_steps)
    pending_units: int = 0  # this rank's images/tokens not yet added to state.units (see Trainer._sync_units)
    interval_start: float = field(default_factory=time.perf_counter)  # when the current metrics interval began
    data_wait: float = 0.0  # seconds of that interval spent waiting for batches


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32) of ``precision``, one of :data:`~nora.train.config.PRECISIONS` (as
    :class:`TrainerConfig` checked)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def param_groups(
    model: nn.Module, lr: float, head_lr: float | None, nora_lr: float | None, weight_decay: float, head: str | None
) -> list[dict]:
    """Optimizer groups: head, NoRA factors, and everything else; no weight decay on biases, norms,
    NoRA factors or any 1-D tensor."""
    nora_ids = {id(p) for m in nora_modules(model).values() for p in m.parameters()}
    groups: dict[str, dict] = {}

    def add(key, p, lr_, wd):
        g = groups.setdefault(key, {"params": [], "lr": lr_, "weight_decay": wd, "name": key})
        g["params"].append(p)

    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        cname = canonical_name(model, name)
        is_head = head is not None and (cname.startswith(head + ".") or f"{head}.modules_to_save" in cname)
        decay = weight_decay if p.dim() >= 2 else 0.0
        if id(p) in nora_ids:
            add("nora", p, nora_lr or lr, 0.0)
        elif is_head:
            add("head" if decay else "head_no_decay", p, head_lr or lr, decay)
        else:
            add("weights" if decay else "weights_no_decay", p, lr, decay)
    return list(groups.values())


def lr_lambda(kind: str, total: int, warmup: int, min_ratio: float):
    """The learning-rate factor of a step for ``kind``, one of :data:`~nora.train.config.SCHEDULERS` (as
    :class:`TrainerConfig` checked)."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else 1 - t
        return min_ratio + (1 - min_ratio) * shape

    return f


@dataclass
class TrainData:
    """What the trainer iterates: the datasets, their batch samplers (``set_epoch`` / ``set_start`` / ``len``) and
    how a batch is made (``collate_fn`` for a DataLoader, or ``loader_factory(dataset, sampler, epoch, train)``
    returning the batches itself, e.g. the device-resident vision path)."""

    train_set: Any
    eval_set: Any
    train_sampler: Any
    eval_sampler: Any
    collate_fn: Callable | None = None
    loader_factory: Callable | None = None


def unused_batches_note(sampler, accum: int) -> str | None:
    """A note when ``trainer.grad_accum`` does not divide an epoch's batches: the batches left over after the
    last full optimizer step (and the partial last batch) are not trained on in that epoch; None when it divides."""
    batches = getattr(sampler, "num_batches", None) or len(sampler)
    left = batches % accum
    if not left:
        return None
    n = getattr(sampler, "n", None) or getattr(getattr(sampler, "lengths", None), "size", None)
    size = getattr(sampler, "batch_size", 0) * getattr(sampler, "num_replicas", 1)
    used = (batches - left) * size
    examples = f": {n - used} of the {n} examples are not used each epoch" if n and size and n > used else ""
    return (
        f"note: an epoch is {batches} batches and trainer.grad_accum={accum} makes {batches // accum} optimizer "
        f"step(s) of {accum} batches; the last {left} batch(es) are skipped{examples} (a different set each epoch "
        f"when shuffled); a grad_accum that divides {batches}, or another trainer.batch_size, uses them all"
    )


class Trainer:
    """Trains ``model`` on ``data`` with ``task``; see :meth:`fit`. ``cfg``: a :class:`TrainerConfig` (or the
    ``trainer`` section it is loaded from) whose ``lr`` is set (the run config resolves the method's defaults);
    ``checkpoint``: the file it writes and resumes from; ``logger``: where records go (``log``/``finish``, e.g.
    :class:`nora.runs.logger.RunLogger`); ``head``: the new classifier head's module name (its own lr)."""

    def __init__(
        self,
        cfg: TrainerConfig,
        model: nn.Module,
        task: Task,
        data: TrainData,
        checkpoint: str | Path,
        logger,
        *,
        head: str | None = None,
        seed: int = 0,
        device: torch.device | None = None,
        wrap=None,
    ):
        self.cfg = cfg = load(TrainerConfig, cfg, "trainer")
        if cfg.lr is None:
            raise UserError("trainer.lr is not set (the run config resolves it from the method's defaults)")
        self.task, self.logger = task, logger
        self.ckpt_path = Path(checkpoint)
        self.device = device or resolve_device(cfg.device)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.model = model.to(self.device)
        self.train_set, self.eval_set = data.train_set, data.eval_set
        self.train_sampler, self.eval_sampler = data.train_sampler, data.eval_sampler
        self.collate_fn, self.seed = data.collate_fn, seed
        # loader_factory(dataset, batch_sampler, epoch, train) -> iterable of batches; default: DataLoader
        self.loader_factory = data.loader_factory
        self.accum = cfg.grad_accum
        self.steps_per_epoch = len(data.train_sampler) // self.accum
        if self.steps_per_epoch < 1:
            raise UserError(
                f"an epoch has {len(data.train_sampler)} batches, fewer than trainer.grad_accum={self.accum}"
            )
        self.micro_per_epoch = self.steps_per_epoch * self.accum
        if dist.rank() == 0:
            note = unused_batches_note(data.train_sampler, self.accum)
            if note:
                log.info(note)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        # the module that runs forward (DDP/FSDP wrapper or compiled); self.model stays the plain one
        self.runner = wrap(self.model) if wrap is not None else self.model
        self._eager_runner = self.runner  # the first forward runs eagerly while a fit-range check waits for it
        if cfg.compile:
            self.runner = torch.compile(self.runner)
        groups = param_groups(self.model, cfg.lr, cfg.head_lr, cfg.nora_lr, cfg.weight_decay or 0.0, head)
        if not groups:
            raise UserError("nothing to train: the method left no parameter with requires_grad")
        self.optimizer = self._optimizer(groups)
        if cfg.warmup_steps is not None and cfg.warmup_steps > self.total_steps:
            raise UserError(
                f"trainer.warmup_steps={cfg.warmup_steps} is more than the run's {self.total_steps} steps: "
                "the peak learning rate would never be reached; lower it or use trainer.warmup_ratio"
            )
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.scheduler, self.total_steps, warmup, cfg.min_lr_ratio)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.show_progress = cfg.progress and dist.rank() == 0
        # the run's state: what a checkpoint saves (load_checkpoint replaces it) and this process's share of it
        self.state = LoopState()
        self.checkpoint_step: int | None = None  # the step of the checkpoint on disk (None: none of this run yet)
        self._session = self._new_session()

    # ------------------------------------------------------------------------------------ set-up
    def _new_session(self) -> Session:
        """This process's accumulators for :attr:`state`: a resumed run goes on with the loss its checkpoint had
        not logged yet (``LoopState.log_loss_sum``/``log_steps``)."""
        return Session(
            loss_sum=torch.full((), self.state.log_loss_sum, device=self.device),
            interval_steps=self.state.log_steps,
            nonfinite=torch.zeros((), dtype=torch.bool, device=self.device),
        )

    def _optimizer(self, groups):
        """AdamW or SGD (``trainer.optimizer``, one of :data:`~nora.train.config.OPTIMIZERS`, as
        :class:`TrainerConfig` checked)."""
        fused = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, momentum=self.cfg.momentum, **fused)
        return torch.optim.AdamW(groups, betas=tuple(self.cfg.betas), **fused)

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loader(self, dataset, sampler, epoch: int, train: bool = True):
        if self.loader_factory is not None:
            return self.loader_factory(dataset, sampler, epoch, train)
        workers = self.cfg.num_workers
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)  # never touches the global RNG
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
            generator=g,
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )

    # ---------------------------------------------------------------------------- checkpointing
    def save_checkpoint(self) -> None:
        """Write ``checkpoints/last.pt`` atomically (rank 0; other ranks write their RNG state)."""
        self._check_finite()
        self._sync_units()
        # the loss not yet logged travels with the checkpoint (a resumed run's next line averages the same steps)
        self.state.log_loss_sum = float(dist.all_reduce_mean(self._session.loss_sum.detach()))
        self.state.log_steps = self._session.interval_steps
        gathered = gather_training_state(self.model, self.optimizer)  # FSDP: all ranks gather; None off rank 0
        if dist.rank() != 0:
            atomic_save(rng_state(), self.ckpt_path.with_name(f"rng_rank{dist.rank()}.pt"))
            return
        model_state, optimizer_state = gathered
        check_finite(model_state, optimizer_state, self.state.step, self.ckpt_path)
        with ctrl_c_deferred():  # the file on disk and checkpoint_step (Ctrl-C's report) change together
            atomic_save(
                {
                    "model": model_state,
                    "optimizer": optimizer_state,
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": rng_state(),
                    "state": asdict(self.state),
                },
                self.ckpt_path,
            )
            self.checkpoint_step = self.state.step

    def load_checkpoint(self, path: str | Path) -> None:
        # mmap: the ranks of a node share one page-cached copy; each tensor reaches the device only as this rank's
        # shard (FSDP) or as the parameter it replaces
        ckpt = read_checkpoint(path)
        load_training_state_dict(self.model, ckpt["model"], path)
        load_optimizer_state_dict(self.optimizer, ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"]
        own = Path(path).with_name(f"rng_rank{dist.rank()}.pt")
        if dist.rank() != 0 and own.exists():
            rng = torch.load(str(own), weights_only=False)
        set_rng_state(rng)
        self.state = LoopState(**ckpt["state"])
        self._session = self._new_session()
        self.checkpoint_step = self.state.step
        self.logger.truncate_after(self.state.step)

    # ---------------------------------------------------------------------------------- checks
    def _check_finite(self) -> None:
        if bool(self._session.nonfinite):
            raise NonFiniteLossError(
                f"non-finite loss at step {self.state.step}; stopped without overwriting the last good "
                f"checkpoint ({self.ckpt_path if self.ckpt_path.exists() else 'none written yet'}); lower the "
                "learning rate or use trainer.precision=fp32/bf16"
            )

    # -------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.runner.eval()
        sums: dict[str, torch.Tensor] = {}
        loader = self._loader(self.eval_set, self.eval_sampler, 0, train=False)
        for batch in loader:
            batch = self.task.to_device(batch, self.device, non_blocking=True)
            with self._autocast():
                out = self.task.eval_sums(self.runner, batch)
            for k, v in out.items():
                sums[k] = sums.get(k, 0) + v.detach().double()
        totals = {k: float(dist.all_reduce_sum(v)) for k, v in sums.items()}
        self.runner.train()
        return self.task.eval_metrics(totals)

    def _record_eval(self) -> dict:
        metrics = self.evaluate()
        key = self.task.metric
        value = metrics[key]
        better = self.state.best is None or (
            value > self.state.best if self.task.higher_is_better else value < self.state.best
        )
        if better:
            self.state.best, self.state.best_step = value, self.state.step
        self.state.last_eval = metrics
        self.logger.log(
            {"step": self.state.step, "epoch": self.state.epoch, **{f"eval/{k}": v for k, v in metrics.items()}}
        )
        return metrics

    # ---------------------------------------------------------------------------------- training
    def fit(self) -> LoopState:
        """Train until ``total_steps`` (or ``stop_after_steps`` in this process), evaluating every
        ``eval_every`` epochs and at the end. Returns the final :class:`LoopState`."""
        session_start = self._session.interval_start = time.perf_counter()  # the clock starts here, not at set-up
        self.runner.train()
        from tqdm.auto import tqdm

        epoch_bar = tqdm(
            total=self.epochs,
            initial=self.state.epoch,
            desc="epochs",
            disable=not self.show_progress,
            position=0,
            leave=True,
            dynamic_ncols=True,
        )
        while self.state.step < self.total_steps and not self._stop():
            self._train_epoch()
            if self.state.batch_in_epoch >= self.micro_per_epoch:  # epoch complete
                self._end_epoch(epoch_bar)
            self._account_time(session_start)
            session_start = time.perf_counter()
            self.save_checkpoint()
        epoch_bar.close()
        self._check_finite()
        if self.state.step >= self.total_steps and not self.state.finished:
            self._record_eval()
            self.state.finished = True
            self._account_time(session_start)
            self.save_checkpoint()
        return self.state

    def _train_epoch(self) -> None:
        """Optimizer steps from ``state.batch_in_epoch`` to the end of the epoch (or of training, or a stop)."""
        from tqdm.auto import tqdm

        epoch = self.state.epoch
        for s in (self.train_sampler, self.train_set):
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)
        self.train_sampler.set_start(self.state.batch_in_epoch)
        loader = iter(self._loader(self.train_set, self.train_sampler, epoch, train=True))
        step_bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.state.batch_in_epoch // self.accum,
            desc=f"epoch {epoch}",
            disable=not self.show_progress,
            position=1,
            leave=False,
            dynamic_ncols=True,
        )
        while self.state.batch_in_epoch < self.micro_per_epoch and self.state.step < self.total_steps:
            self._train_step(loader)
            step_bar.update(1)
            self._after_step(step_bar)
            if self._stop():
                break
        step_bar.close()

    def _step_runner(self):
        """The compiled runner, except while the model's fit-range check (nora.adapter.ranges) is pending: that
        forward runs eagerly (the check's hooks remove themselves after it), so compilation sees the model without
        them and traces it whole instead of in fragments split at every activation."""
        if self.runner is not self._eager_runner and fit_range_check_pending(self.model):
            return self._eager_runner
        return self.runner

    def _train_step(self, loader) -> None:
        """One optimizer step over ``grad_accum`` micro-batches. Its loss is the sum of the item losses (images,
        supervised tokens) of all micro-batches on all ranks divided by their total count: the step's items are
        counted first, and each rank divides by count / world_size since DDP/FSDP average the ranks' gradients."""
        t_data = time.perf_counter()
        batches = [next(loader) for _ in range(self.accum)]
        session = self._session
        session.pending_units += sum(self.task.units(b) for b in batches)  # counted before the copy: no device sync
        normalizer = self._global_count(sum(self.task.items(b) for b in batches)) / dist.world_size()
        session.data_wait += time.perf_counter() - t_data
        for i, batch in enumerate(batches):
            batch = self.task.to_device(batch, self.device, non_blocking=True)
            with nullcontext() if i == self.accum - 1 else dist.no_sync(self.runner):
                with self._autocast():
                    loss = self.task.loss(self._step_runner(), batch, normalizer)
                self.scaler.scale(loss).backward()
            session.loss_sum += loss.detach().float()
            session.nonfinite |= ~torch.isfinite(loss.detach())
            self.state.batch_in_epoch += 1
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        session.steps += 1
        session.interval_steps += 1

    def _global_count(self, count: int):
        """``count`` summed over the ranks (at least 1: a step without any supervised token has loss 0)."""
        if dist.world_size() == 1:
            return float(max(count, 1))
        return dist.all_reduce_sum(torch.tensor(float(count), device=self.device)).clamp_min(1.0)

    def _after_step(self, step_bar) -> None:
        step, cfg = self.state.step, self.cfg
        if self.device.type == "cpu":
            self._check_finite()  # free on the CPU; on GPUs checked at log/checkpoint time
        if step % cfg.log_every == 0 or step == self.total_steps:
            self._log_interval(step_bar)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            self.save_checkpoint()

    def _end_epoch(self, epoch_bar) -> None:
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        epoch_bar.update(1)
        every = self.cfg.eval_every
        if every and self.state.epoch % every == 0 and self.state.step < self.total_steps:
            self._record_eval()

    def _sync_units(self) -> int:
        """Add the units trained since the last call, summed over ranks, to ``state.units``. Called at
        log intervals, checkpoints and the end only: no per-step collective or host sync."""
        units = self._session.pending_units
        if dist.world_size() > 1:
            units = int(dist.all_reduce_sum(torch.tensor(units, device=self.device)))
        self._session.pending_units = 0
        self.state.units += units
        return units

    def _stop(self) -> bool:
        """``trainer.stop_after_steps`` steps were taken in this process (tests, time-boxing), or SIGTERM was
        received (nora.train.signals): stop with a checkpoint."""
        return (
            self.cfg.stop_after_steps is not None and self._session.steps >= self.cfg.stop_after_steps
        ) or stop_requested(self.device)

    def _account_time(self, since: float) -> None:
        now = time.perf_counter()
        self.state.wall_time += now - since

    def _log_interval(self, bar) -> None:
        """A metrics line for the interval since the last one; starts the next interval."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._check_finite()
        session, now = self._session, time.perf_counter()
        elapsed = max(now - session.interval_start, 1e-9)
        steps = max(session.interval_steps, 1)
        loss = float(dist.all_reduce_mean(session.loss_sum.detach())) / steps
        units_per_s = self._sync_units() / elapsed  # summed over ranks
        self.state.train_time += elapsed
        self.state.data_time += session.data_wait
        record = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            f"{self.task.unit}_per_s": units_per_s,
            "data_wait_share": session.data_wait / elapsed,
        }
        self.logger.log(record)
        bar.set_postfix(loss=f"{loss:.4f}", **{f"{self.task.unit[:3]}/s": f"{units_per_s:.0f}"})
        session.loss_sum.zero_()
        session.interval_start, session.data_wait, session.interval_steps = now, 0.0, 0
