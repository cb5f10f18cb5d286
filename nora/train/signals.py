"""How a training run stops when asked to: it never loses the work it has done, and says so in one line.

- SIGTERM (what SLURM sends at preemption or the time limit, and ``kill``'s default) and SIGUSR2 (the signal
  submitit's SLURM launcher asks for ``signal_delay_s`` before the time limit): the loop finishes the current
  optimizer step, writes a checkpoint at that step and stops. Under submitit, its own handler for the signal
  (which requeues the job) then runs, so the requeued job resumes from that checkpoint; otherwise the process
  exits with one line and status 128 + the signal's number.
- Ctrl-C (SIGINT) stops at once, as Python does by default, and is reported as one line saying at which step
  it stopped and at which step the last checkpoint was written.
- A rank that dies (``kill -9``, out of memory) under torchrun: each surviving rank ends with one line saying so
  and where the last checkpoint is (the collective it was in fails; it never hangs).
- SIGTERM while the run sets up (data, model, method: :class:`SetupGuard`) stops it with one line and status 143
  (nothing was trained yet; the lock and any checkpoint are left as they were), where the process would otherwise
  die silently with -15. Only where nobody else handles SIGTERM (submitit's handler is kept).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from nora.errors import Interrupted, Terminated, UserError
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
        raise Interrupted(
            f"interrupted at step {trainer.state.step}; last checkpoint at step "
            f"{last if last is not None else '(none written)'}; run the same command to resume",
            exit_code=128 + signal.SIGINT,
        ) from None
    except RuntimeError as exc:  # a collective whose other end is gone: one line per surviving rank, no traceback
        if not dist.peer_lost(exc):
            raise
        last = trainer.checkpoint_step
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        why = why.split("] ", 1)[-1].split(". ")[0][:160]  # gloo: "[<source>:<line>] <what>. This is typically..."
        raise UserError(
            f"rank {dist.rank()}: another rank of this run stopped (killed, crashed or out of memory) "
            f"at step {trainer.state.step}: {why}; last checkpoint at step "
            f"{last if last is not None else '(none written)'}; run the same command to resume"
        ) from None
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


class SetupGuard:
    """``with SetupGuard() as guard:`` around a run's setup; ``guard.release()`` just before training starts
    (:func:`stop_on_signals` takes over). SIGTERM in between raises :class:`Interrupted` (one line, exit status
    143), unwinding the setup (the run directory's lock is released)."""

    def __init__(self):
        self._previous = None

    def __enter__(self) -> "SetupGuard":
        term = getattr(signal, "SIGTERM", None)
        if (
            term
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(term) in (signal.SIG_DFL, None)
        ):
            self._previous = signal.signal(term, self._stop)
        return self

    @staticmethod
    def _stop(signum, frame) -> None:
        kind = Terminated if signum == getattr(signal, "SIGTERM", None) else Interrupted
        raise kind(
            f"stopped by {signal.Signals(signum).name} during setup, before training (re)started; "
            "run the same command to start it",
            exit_code=128 + signum,
        )

    def release(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __exit__(self, *exc) -> None:
        self.release()


def _stopped_by(signum: int, trainer, previous_handler) -> None:
    """After the loop stopped on ``signum`` with a checkpoint: hand over to the handler that was there before
    ours (submitit's requeue), or end with one line."""
    if callable(previous_handler):
        previous_handler(signum, None)
    raise Interrupted(
        f"stopped by {signal.Signals(signum).name} at step {trainer.state.step}; checkpoint written at "
        f"step {trainer.checkpoint_step}; run the same command to resume",
        exit_code=128 + signum,
    )
