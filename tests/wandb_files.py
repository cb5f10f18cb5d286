"""Read W&B's offline run files (``<run dir>/wandb/offline-run-*/run-<id>.wandb``) back, as tests check them.

wandb 0.31 ships no Python reader: the file is W&B's transaction log, LevelDB's log format (32 KiB blocks of
records with a 7-byte header: CRC32C, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte ``:W&B`` file header,
each record one ``wandb_internal_pb2.Record`` protobuf (what ``wandb sync`` uploads).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32 * 1024
FILE_HEADER = 7  # b":W&B", magic 0xBEE1, version
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    """Every ``Record`` in a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    pos, parts = FILE_HEADER, []
    while pos + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        if kind == 0 and length == 0:
            break
        parts.append(data[pos + RECORD_HEADER : pos + RECORD_HEADER + length])
        pos += RECORD_HEADER + length
        if kind in (FULL, LAST):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


@dataclass
class OfflineRun:
    """What one offline run file says: the run's id, name and group, config, logged history and summary."""

    path: Path
    run_id: str = ""
    name: str = ""
    group: str = ""
    resumed: bool = False
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    exit_code: int | None = None


def _items(items) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def read_offline_run(run_dir: str | Path, wait_s: float = 60.0) -> OfflineRun:
    """An ``offline-run-*`` directory's ``.wandb`` file, decoded. W&B's service writes the file in the background
    and may still be flushing it when ``finish()`` has returned: wait up to ``wait_s`` for the run's exit record."""
    (path,) = Path(run_dir).glob("*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        run = _decode(path)
        if run.exit_code is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.5)


def _decode(path: Path) -> OfflineRun:
    run = OfflineRun(path)
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.name, run.group = rec.run.run_id, rec.run.display_name, rec.run.run_group
            run.resumed = bool(rec.run.resumed)
            run.config.update(_items(rec.run.config.update))
        elif kind == "config":
            run.config.update(_items(rec.config.update))
        elif kind == "history":
            run.history.append(_items(rec.history.item))
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    return run


def offline_runs(run_dir: str | Path) -> list[OfflineRun]:
    """Every offline W&B run of a run directory, oldest first: by the first timestamp of the run's ``logs/debug.log``
    (milliseconds), since the folder name's start time (``offline-run-YYYYMMDD_HHMMSS-<id>``) has whole seconds and
    two runs started in one second would sort by their random ids (file times are no better: W&B's service may
    still be writing an earlier run's files)."""

    def started(d: Path) -> str:
        log = d / "logs" / "debug.log"
        if not log.exists():
            return d.name
        with open(log, errors="replace") as f:
            first = f.readline()
        return first[:23] if first[:4].isdigit() else d.name

    return [read_offline_run(d) for d in sorted(Path(run_dir, "wandb").glob("offline-run-*"), key=started)]
