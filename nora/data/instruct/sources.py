"""Where raw records come from: local .json/.jsonl/.parquet files, save_to_disk directories, or the Hub; each
source is checked for the dataset's fields before anything is tokenised."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from nora.data.instruct.config import DataError, DataNotFoundError, InstructDataConfig

logger = logging.getLogger(__name__)

EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_WORDS = ("train", "test", "validation", "valid", "val", "dev", "eval")


def format_help(cfg: InstructDataConfig) -> str:
    return (
        f"Put a local copy on disk and pass data.path=<file or dir>: {cfg.spec.fmt}. To fetch it on a machine "
        f"with Hub access: hf download --repo-type dataset {cfg.resolved_hub_name} --local-dir <dir>"
    )


def local_files(cfg: InstructDataConfig) -> tuple[str, Path, list[Path]]:
    """``(kind, root, files)``: kind ``saved`` (save_to_disk directory) or ``files``."""
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DataNotFoundError(f"data.path={cfg.path}: no such file or directory. {format_help(cfg)}")
    if root.is_file():
        if root.suffix.lower() not in EXTENSIONS:
            raise DataError(f"data.path={cfg.path}: unsupported file type {root.suffix!r}; {cfg.spec.fmt}")
        return "files", root, [root]
    if (root / "dataset_dict.json").exists() or (
        (root / "state.json").exists() and (root / "dataset_info.json").exists()
    ):
        return "saved", root, sorted(p for p in root.rglob("*") if p.is_file())
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataNotFoundError(
            f"data.path={cfg.path}: the directory holds no .json/.jsonl/.parquet files and "
            f"was not written by save_to_disk. {format_help(cfg)}"
        )

    def splits_named(p: Path) -> set[str]:
        words = set(re.split(r"[^a-z0-9]+", str(p.relative_to(root)).lower()))
        return {w for w in SPLIT_WORDS if w in words}

    tagged = [p for p in files if splits_named(p)]
    if tagged:
        mine = [p for p in files if cfg.split.lower() in splits_named(p)]
        if not mine:
            raise DataNotFoundError(
                f"data.path={cfg.path}: its files name splits "
                f"{sorted(set().union(*map(splits_named, tagged)))} but none is "
                f"data.split={cfg.split}"
            )
        files = mine
    return "files", root, files


def files_fingerprint(root: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    big = 256 << 20
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        with open(f, "rb") as fh:
            if st.st_size <= big:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(1 << 20))
                fh.seek(st.st_size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def check_columns(ds, where: str, cfg: InstructDataConfig):
    import datasets

    cols = list(ds.column_names)
    missing = [c for c in cfg.spec.required if c not in cols]
    if missing:
        raise DataError(
            f"{where}: missing field(s) {missing} for dataset={cfg.name}; expected fields "
            f"{list(cfg.spec.required)} (optional: {list(cfg.spec.optional)}); found {cols}"
        )
    extra = [c for c in cols if c not in cfg.spec.required]
    if extra:
        logger.debug("%s: ignoring field(s) %s", where, extra)
    ds = ds.select_columns(list(cfg.spec.required))
    reject_nulls(ds, where, cfg)
    reject_non_strings(ds, where, cfg)
    if all(getattr(ds.features[c], "dtype", None) in TEXT_DTYPES for c in cfg.spec.required):
        return ds  # nothing to convert (casting would rewrite every row)
    # only all-null columns are left (a field that may be null, e.g. every Alpaca input null): null -> string
    return ds.cast(datasets.Features({c: datasets.Value("string") for c in cfg.spec.required}))


TEXT_DTYPES = ("string", "large_string")


def first_non_string(ds, field: str) -> tuple[int, object, int, str] | None:
    """``(record, value, count, column)`` of the first record whose ``field`` holds something other than text or null
    (a number, bool, list or object), as it stands in the file; None when every value is text or null.

    ``datasets`` reads a JSON field that mixes strings with other values as its ``Json`` feature (each value
    JSON-encoded: a string keeps its quotes) and a field of numbers as int64/float64: cast to text, either
    would train on ``"Paris ..."`` or ``5``. A parquet column of another type is the same."""
    import json

    feature = ds.features[field]
    if getattr(feature, "dtype", None) in TEXT_DTYPES + ("null",):
        return None
    table = ds.flatten_indices().data if getattr(ds, "_indices", None) is not None else ds.data
    values = table.column(field).to_pylist()
    column = f"the field was read as {getattr(feature, 'dtype', type(feature).__name__)}"
    if type(feature).__name__ == "Json":  # the stored JSON text of each value
        values = [None if v is None else json.loads(v) for v in values]
        column = "the field mixes text with other values"
    bad = [i for i, v in enumerate(values) if v is not None and not isinstance(v, str)]
    return (bad[0], values[bad[0]], len(bad), column) if bad else None


def reject_non_strings(ds, where: str, cfg: InstructDataConfig) -> None:
    """Every required field must hold text: raise naming the source, the first record (0-based) and field whose
    value is a number, bool, list or object, before ``datasets`` casts (JSON-encodes) the whole field."""
    for field in cfg.spec.required:
        found = first_non_string(ds, field)
        if found is None:
            continue
        record, value, count, column = found
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise DataError(
            f"{where}: record {record} (counting from 0) has {field}={shown} "
            f"({type(value).__name__}), not text; dataset={cfg.name} needs strings in "
            f"{list(cfg.spec.required)} ({count} record(s) with a non-string {field}; {column}); write it "
            "as a string in the file"
        )


def reject_nulls(ds, where: str, cfg: InstructDataConfig) -> None:
    """A null in a field that must hold text (Alpaca's instruction/output, OpenOrca's question/response) would
    train as an empty prompt or response: raise naming the source and the first such record (0-based)."""
    table = ds.flatten_indices().data if getattr(ds, "_indices", None) is not None else ds.data
    for field in cfg.spec.required:
        column = table.column(field)
        if field in cfg.spec.may_be_null or column.null_count == 0:
            continue
        first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f"{where}: record {first} (counting from 0) has {field}=null; dataset={cfg.name} needs "
            f"text in {[f for f in cfg.spec.required if f not in cfg.spec.may_be_null]} "
            f"({column.null_count} record(s) with {field}=null)"
        )


def load_local(cfg: InstructDataConfig, kind: str, root: Path, files: Sequence[Path], hf_cache: Path):
    import datasets

    if kind == "saved":
        try:
            ds = datasets.load_from_disk(str(root))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"data.path={cfg.path}: could not read the save_to_disk directory: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataError(f"data.path={cfg.path}: no split {cfg.split!r}; it has {list(ds)} (set data.split)")
            ds = ds[cfg.split]
        return check_columns(ds, str(root), cfg)
    parts = []
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: empty file (0 bytes: an interrupted copy or download?). Expected {cfg.spec.fmt}")
        try:
            ds = datasets.load_dataset(
                EXTENSIONS[f.suffix.lower()], data_files=str(f), split="train", cache_dir=str(hf_cache)
            )
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise DataError(
                f"{f}: could not be read as {f.suffix} records ({type(e).__name__}: {msg}). Expected {cfg.spec.fmt}"
            ) from None
        parts.append(check_columns(ds, str(f), cfg))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_hub(cfg: InstructDataConfig):
    import datasets

    hub = cfg.resolved_hub_name
    try:
        ds = datasets.load_dataset(hub, split=cfg.split)
    except Exception as e:  # noqa: BLE001  offline, unreachable, gated, missing: one message
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)) or os.environ.get(
            "HF_DATASETS_OFFLINE", "0"
        ).upper() in ("1", "ON", "YES", "TRUE")
        token = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
        gated = any(
            w in (type(e).__name__ + text).lower() for w in ("gated", "401", "403", "unauthorized", "authenticat")
        )
        if offline:
            why = (
                "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and it is not in the local Hugging Face cache"
            )
        elif gated:
            why = "the dataset is gated or private and " + (
                "the HF_TOKEN in the environment was refused" if token else "no HF_TOKEN is set in the environment"
            )
        else:
            why = "the Hub could not be reached or has no such dataset"
        raise DataNotFoundError(
            f"dataset={cfg.name}: could not load '{hub}' (split {cfg.split}) from the Hugging Face Hub: {why} "
            f"[{type(e).__name__}: {text}]. {format_help(cfg)}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover (split= returns a Dataset)
        ds = ds[cfg.split]
    return check_columns(ds, f"hub dataset {hub}", cfg), ds._fingerprint
