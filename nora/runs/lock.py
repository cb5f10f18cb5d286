"""A run directory has one owner: the process that trains into it holds an exclusive lock for the whole run.

The lock is ``fcntl.flock`` on ``<run dir>/.lock``: the kernel releases it when its holder exits or dies (even
on ``kill -9``), so a lock can never outlive its process; a lock file left by a dead process is simply taken over.
The file itself records who holds it (pid, host, start time), so a second process trying to use the same
directory (the same command twice, two configs with one ``run_name``, two SLURM array tasks) stops at once with
one line naming the holder, before it reads or writes anything there.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from datetime import datetime, timezone

from nora.errors import UserError
from nora.runs.layout import RunDir

log = logging.getLogger(__name__)


class RunDirInUse(UserError):
    """Another live process holds the run directory."""


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir`` exclusively (see the module docstring). Not re-entrant: a
    process trains one run at a time. On a file system without locks it warns and goes on unprotected."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = RunDir(run_dir).lock
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if _launch_rank() != 0:  # the ranks of one distributed run share its directory; rank 0 holds it
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:  # made by hand or another tool: not ours to delete
            raise UserError(
                f"{self.path} is a directory, not the run's lock file; remove it (it is not nora's) and run again"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise RunDirInUse(
                f"{self.path.parent} is in use by {holder}; wait for it to finish, stop it, or "
                "choose another run_name/output_root"
            ) from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system without locks (some NFS/Lustre mounts)
            os.close(fd)
            log.warning(
                f"cannot lock {self.path} ([Errno {exc.errno}] {exc.strerror}): this file system has no "
                "file locks, so nothing stops a second process from using this run directory at the same time"
            )
            return self
        previous = _read_holder(fd)
        if previous and not _is_us(previous):
            log.info(
                f"{self.path.parent}: taking over the lock left by {_describe(previous)}, which is no longer running"
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock (the file stays: deleting it would let a third process lock a new file while a second one
        still waits on the old one's inode)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _launch_rank() -> int:
    """This process's rank as its launcher set it (torchrun: RANK; SLURM tasks: SLURM_PROCID), before any
    process group exists."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def _read_holder(fd: int) -> dict | None:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_us(holder: dict) -> bool:
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process (no pid recorded yet)"
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
