"""File helpers every part of nora shares: atomic writes and the cache directory.

An atomic write goes to a temp file in the target's directory (unique per process and call, so two writers
never share one), is flushed and fsynced, then renamed onto the target: a crash, a kill or a full disk leaves
the previous file as it was, never a half-written one; a write the file system refuses (disk full, read-only,
no permission) raises :class:`nora.errors.OutputError`, one line with the path and the errno.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from nora.errors import WRITE_ERRNOS, OutputError


def cache_dir(*parts: str) -> Path:
    """``$NORA_CACHE_DIR/<parts>`` (default ``~/.cache/nora/<parts>``); not created."""
    root = os.environ.get("NORA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nora")
    return Path(root, *parts)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_path_for(path: str | os.PathLike) -> Path:
    """A fresh, unique temp path next to ``path`` (same file system, so ``os.replace`` is atomic), with the mode a
    plain ``open`` would give (``0666 & ~umask``: group-readable under the usual 022 or 002, not mkstemp's 0600, so
    another user of a shared group directory can read the run)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(tmp)


TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp")  # what temp_path_for names a file


def remove_stale_temps(
    directory: str | os.PathLike, *, min_age_s: float = 0.0, spare: Callable[[str], bool] = lambda target: False
) -> list[Path]:
    """Remove the temp files (:func:`temp_path_for`) an interrupted write left in ``directory`` (a kill, a power
    loss between the write and the rename) and return them. Only call it while no other process may be writing
    there (the run's lock held); ``min_age_s`` spares younger files, ``spare(target name)`` those of some targets."""
    removed = []
    now = time.time()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            m = TEMP_NAME.fullmatch(entry.name)
            if m is None or not entry.is_file(follow_symlinks=False) or spare(m["target"]):
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat(follow_symlinks=False).st_mtime >= min_age_s:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path to write ``path``'s new content to; on success it replaces ``path`` atomically,
    on any error the temp file is removed and ``path`` is untouched::

        with atomic_path(out / "adapter.safetensors") as tmp:
            save_file(tensors, str(tmp))
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(path)
    except OSError as exc:
        _raise_if_refused(exc, path)
        raise
    try:
        yield tmp
        # the umask's mode again: some writers (safetensors) replace the temp file with one of their own, 0600
        os.chmod(tmp, 0o666 & ~current_umask())
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            _raise_if_refused(exc, path)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it becomes ``path`` in one rename (a cache entry is whole or absent),
    on any error it is removed. When another process published ``path`` first, its copy is kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)  # a unique name, claimed as a file: a folder takes its place
    tmp.unlink()
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _raise_if_refused(exc: OSError, path: Path) -> None:
    """A write the file system refused becomes a one-line :class:`OutputError` naming ``path``."""
    if exc.errno in WRITE_ERRNOS:
        raise OutputError(
            f"{OutputError.from_os_error(exc, path)}; the previous {path.name}, if any, is unchanged"
        ) from exc


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], *, fsync: bool = True) -> None:
    """``write(tmp)`` then rename ``tmp`` onto ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path, fsync=fsync) as tmp:
        write(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in ``path``, or None when the file is missing or not valid JSON (a half-written file)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
