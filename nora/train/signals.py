"""How a training run stops when asked to: it never loses the work it has done, and says so in one line.

- SIGTERM (what SLURM sends at preemption or the time limit, and ``kill``'s default) and SIGUSR2 (the signal
  submitit's SLURM launcher asks for ``signal_delay_s`` before the time limit): the loop finishes the current
  optimizer step, writes a checkpoint at that step and stops. Under submitit, its own handler for the signal
  (which requeues the job) then runs, so the requeued job resumes from that checkpoint; otherwise the process
  exits with one line and status 128 + the signal's number.
- Ctrl-C (SIGINT) stops at once, as Python does by default, and is reported as one line saying at which step
  it stopped and at which step the last checkpoint was written.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from nora.errors import Interrupted
from nora.train import distributed as dist

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR2", None)) if s)

_received: list[int] = []  # signals received while a run is training (set by the handler, read by the loop)


def _handle(signum, frame) -> None:
    _received.append(signum)


def stop_requested(device: torch.device | None = None) -> bool:
    """Whether a stop signal arrived. With several ranks every rank must call it at the same step: the answer
    is agreed between them (a rank that got the signal one step later would otherwise wait forever in the
    next collective), at the cost of one tiny all-reduce."""
    if dist.world_size() == 1:
        return bool(_received)
    flag = torch.tensor(float(bool(_received)), device=device)
    return bool(dist.all_reduce_sum(flag) > 0)


@contextmanager
def stop_on_signals(trainer) -> Iterator[None]:
    """Run ``trainer.fit()`` inside this: installs the stop handlers for its duration (restoring the previous
    ones after) and turns a stop into :class:`Interrupted` with where it stopped."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    _received.clear()
    previous = {s: signal.signal(s, _handle) for s in STOP_SIGNALS}
    try:
        yield
    except KeyboardInterrupt:
        last = trainer.checkpoint_step
        raise Interrupted(f"interrupted at step {trainer.state.step}; last checkpoint at step "
                          f"{last if last is not None else '(none written)'}; run the same command to resume",
                          exit_code=128 + signal.SIGINT) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if _received and not trainer.state.finished:
        _stopped_by(_received[0], trainer, previous.get(_received[0]))


@contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Ctrl-C waits until the block is done (then raises as usual): a checkpoint written by the block and the step
    the trainer records for it never disagree (an interrupt between the two would report the previous one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def _stopped_by(signum: int, trainer, previous_handler) -> None:
    """After the loop stopped on ``signum`` with a checkpoint: hand over to the handler that was there before
    ours (submitit's requeue), or end with one line."""
    if callable(previous_handler):
        previous_handler(signum, None)
    raise Interrupted(f"stopped by {signal.Signals(signum).name} at step {trainer.state.step}; checkpoint written at "
                      f"step {trainer.checkpoint_step}; run the same command to resume", exit_code=128 + signum)
