"""Tokenise once, cache on disk, load memory-mapped: :func:`build_instruct_datasets`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import nora.data.instruct.tokenization as tokenization
from nora.data.instruct.config import DataError, InstructDataConfig, default_cache_dir
from nora.data.instruct.dataset import InstructDataset, PackedInstructDataset
from nora.data.instruct.sources import files_fingerprint, load_hub, load_local, local_files
from nora.errors import WRITE_ERRNOS, OutputError
from nora.files import read_json, write_json_atomic

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the tokenised format or the tokenisation rules change (2: non-string fields refused)


def build_instruct_datasets(cfg: InstructDataConfig | Mapping[str, Any], tokenizer):
    """Load, check, subset, split, tokenise (once; cached) -> ``(train_dataset, val_dataset, stats)``.

    ``train_dataset`` is an :class:`InstructDataset` (a :class:`PackedInstructDataset` with ``cfg.packing``),
    ``val_dataset`` an :class:`InstructDataset` or None (``val_size=0``). ``stats`` holds the counts (rows read
    and selected, per-split examples, truncated, prompt-truncated, dropped, boundary fallbacks, tokens,
    supervised tokens), ``cache_hit`` and ``cache_path``."""
    if not isinstance(cfg, InstructDataConfig):
        cfg = InstructDataConfig.from_dict(cfg)
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    raw = None
    if cfg.path is not None:
        kind, root, files = local_files(cfg)
        source, source_fp = str(root.resolve()), files_fingerprint(root, files)
    else:
        raw, source_fp = load_hub(cfg)
        source = f"hub:{cfg.resolved_hub_name}"
    template = cfg.resolved_template
    key_fields = {
        "version": CACHE_VERSION,
        "name": cfg.name,
        "source": source_fp,
        "split": cfg.split,
        "subset_size": cfg.subset_size,
        "subset_strategy": cfg.subset_strategy,
        "seed": int(cfg.seed),
        "val_size": cfg.val_size,
        "template": template,
        "use_chat": bool(cfg.use_tokenizer_chat_template),
        "max_length": int(cfg.max_length),
        "min_response_tokens": int(cfg.min_response_tokens),
        "tokenizer": tokenization.tokenizer_fingerprint(tokenizer),
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:24]
    final = cache_root / f"{cfg.name}-{key}"
    opened, why = open_cache(final, key)
    cache_hit = opened is not None
    if not cache_hit:
        from filelock import FileLock

        check_cache_writable(cache_root)
        with FileLock(str(cache_root / f".{cfg.name}-{key}.lock")):
            opened, why = open_cache(final, key)  # another rank finished it meanwhile
            if opened is None:
                if why is not None:  # there, but not what it claims to be: rebuilt, and said so
                    logger.warning("tokenised cache %s is damaged (%s); rebuilding it", final, why)
                    shutil.rmtree(final, ignore_errors=True)
                if raw is None:
                    raw = load_local(cfg, kind, root, files, cache_root / "hf")
                build_cache(cfg, tokenizer, raw, final, source, key)
                opened, why = open_cache(final, key)
                if opened is None:
                    raise DataError(
                        f"tokenised cache {final} is unreadable right after it was built ({why}); "
                        "check the disk, or set dataset.cache_dir (or NORA_CACHE_DIR) elsewhere"
                    )
    stats, train_ds, val_ds = opened
    stats.update(cache_hit=cache_hit, cache_path=str(final))
    dropped = stats["num_dropped"]
    if dropped:
        logger.warning(
            "instruction data %s: %d examples had no response token left within max_length=%d and were dropped",
            cfg.name,
            dropped,
            cfg.max_length,
        )
    if stats["num_train"] == 0:
        raise DataError(
            f"dataset={cfg.name}: no training example left (max_length={cfg.max_length} leaves no "
            "response token after the tokenizer's own prefix); raise data.max_length"
        )
    train = InstructDataset(train_ds, stats["train"], "train")
    val = InstructDataset(val_ds, stats["val"], "val") if val_ds is not None else None
    if cfg.packing:
        train = PackedInstructDataset(train, int(cfg.max_length))
        stats["packing"] = {"rows": len(train), "fill": round(train.fill, 4)}
    t = stats["train"]
    logger.info(
        "instruction data %s (%s, template %s, max_length %d)%s: %d rows read, %d selected -> %d train / %d val "
        "examples; %d truncated (%d with the prompt cut), %d dropped without response tokens; %d train tokens "
        "(%d supervised)%s",
        cfg.name,
        source,
        template,
        cfg.max_length,
        " [cached]" if cache_hit else "",
        stats["num_rows"],
        stats["num_selected"],
        stats["num_train"],
        stats["num_val"],
        stats["num_truncated"],
        stats["num_prompt_truncated"],
        dropped,
        t["num_tokens"],
        t["num_supervised_tokens"],
        f"; packed into {len(train)} rows ({100 * train.fill:.1f}% full)" if cfg.packing else "",
    )
    return train, val, stats


def check_cache_writable(cache_root: Path) -> None:
    """Create ``cache_root`` and make sure a file can be written there; else one line saying where to point it."""
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_root):
            pass
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise OutputError(
            f"cannot write the tokenised-data cache {cache_root}: [Errno {exc.errno}] {exc.strerror}; "
            "set NORA_CACHE_DIR (or dataset.cache_dir) to a writable folder"
        ) from None


def open_cache(final: Path, key: str) -> tuple[tuple[dict, Any, Any] | None, str | None]:
    """``((stats, train, val), None)`` for an intact cache entry; ``(None, None)`` when there is none, ``(None,
    why)`` when it is there but damaged: ``stats.json`` unreadable or of another key, a file of its manifest missing
    or of another size (a truncated ``.arrow``), a split missing or not holding the recorded number of rows."""
    import datasets

    if not final.exists():
        return None, None
    stats = read_json(final / "stats.json")
    if not isinstance(stats, dict) or not {"num_train", "num_val", "train", "val"} <= set(stats):
        return None, "stats.json missing or unreadable"
    if stats.get("key", key) != key:
        return None, f"stats.json is of key {stats.get('key')}, not {key}"
    for rel, size in (stats.get("files") or {}).items():
        f = final / rel
        if not f.is_file() or f.stat().st_size != size:
            return None, f"{rel} is {f.stat().st_size if f.is_file() else 'missing'} bytes, not {size}"
    splits = []
    for split in ("train", "val"):
        n = stats[f"num_{split}"]
        if not n:
            splits.append(None)
            continue
        try:
            ds = datasets.load_from_disk(str(final / split))
            rows = len(ds)
        except Exception as exc:  # noqa: BLE001  a missing or damaged split: pyarrow and datasets raise many types
            return None, f"{split}/ does not load ({type(exc).__name__})"
        if rows != n:
            return None, f"{split}/ holds {rows} rows, stats.json records {n}"
        splits.append(ds)
    return (stats, *splits), None


def select_rows(cfg: InstructDataConfig, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row numbers of the subset, and the positions (within it) of the train and validation rows."""
    if cfg.subset_size is not None and n > int(cfg.subset_size):
        if cfg.subset_strategy == "first":
            rows = np.arange(int(cfg.subset_size))
        else:
            rows = np.sort(np.random.default_rng(int(cfg.seed)).permutation(n)[: int(cfg.subset_size)])
    else:
        rows = np.arange(n)
    m = len(rows)
    n_val = int(round(cfg.val_size * m)) if isinstance(cfg.val_size, float) else int(cfg.val_size)
    if n_val >= m:
        raise DataError(
            f"data.val_size={cfg.val_size} holds out {n_val} of the {m} selected rows and leaves none "
            "for training; lower data.val_size (0 for no validation set)"
        )
    val = np.sort(np.random.default_rng([int(cfg.seed), 1]).permutation(m)[:n_val])
    train = np.setdiff1d(np.arange(m), val, assume_unique=True)
    return rows, train, val


def build_cache(cfg: InstructDataConfig, tokenizer, raw, final: Path, source: str, key: str) -> None:
    n = len(raw)
    if n == 0:
        raise DataError(f"dataset={cfg.name} ({source}): no rows")
    rows, train_pos, val_pos = select_rows(cfg, n)
    subset = raw.select(rows) if len(rows) < n else raw
    # built in a fresh directory next to the entry, renamed into place when complete (a directory cannot go
    # through nora.files.atomic_path); a failed build is removed, a killed one leaves a hidden .tmp directory
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        _tokenize_into(
            cfg,
            tokenizer,
            subset,
            tmp,
            key,
            stats={
                "dataset": cfg.name,
                "source": source,
                "split": cfg.split,
                "template": cfg.resolved_template,
                "max_length": int(cfg.max_length),
                "num_rows": n,
                "num_selected": len(rows),
                "key": key,
            },
            train_pos=train_pos,
            val_pos=val_pos,
        )
        os.replace(tmp, final)
    except OSError:
        if not final.joinpath("stats.json").exists():
            raise
    finally:  # a complete copy was already there, or the build failed
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenize_into(
    cfg: InstructDataConfig,
    tokenizer,
    subset,
    tmp: Path,
    key: str,
    stats: dict[str, Any],
    train_pos: np.ndarray,
    val_pos: np.ndarray,
) -> None:
    """Tokenise ``subset`` and write the train/val splits and ``stats.json`` into the directory ``tmp``."""
    import datasets

    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "length": datasets.Value("int32"),
            "n_supervised": datasets.Value("int32"),
            "truncated": datasets.Value("bool"),
            "prompt_truncated": datasets.Value("bool"),
            "boundary_fallback": datasets.Value("bool"),
        }
    )
    tok = subset.map(
        tokenization.tokenize_batch,
        batched=True,
        batch_size=1000,
        remove_columns=subset.column_names,
        features=features,
        fn_kwargs=dict(
            tokenizer=tokenizer,
            name=cfg.name,
            template=cfg.resolved_template,
            use_chat=bool(cfg.use_tokenizer_chat_template),
            max_length=int(cfg.max_length),
            min_response_tokens=int(cfg.min_response_tokens),
            prefix=tokenization.special_prefix(tokenizer),
        ),
        cache_file_name=str(tmp / "tokenized.arrow"),
        load_from_cache_file=False,
        new_fingerprint=key,
        desc=f"tokenizing {cfg.name}",
    )
    table = tok.data
    col = {
        c: table.column(c).to_numpy()
        for c in ("length", "n_supervised", "truncated", "prompt_truncated", "boundary_fallback")
    }
    for split, pos in (("train", train_pos), ("val", val_pos)):
        keep = pos[col["n_supervised"][pos] > 0]
        stats[split] = {
            "num_total": int(len(pos)),
            "num_examples": int(len(keep)),
            "num_dropped": int(len(pos) - len(keep)),
            "num_truncated": int(col["truncated"][pos].sum()),
            "num_prompt_truncated": int(col["prompt_truncated"][pos].sum()),
            "num_boundary_fallback": int(col["boundary_fallback"][pos].sum()),
            "num_tokens": int(col["length"][keep].sum()),
            "num_supervised_tokens": int(col["n_supervised"][keep].sum()),
            "max_example_length": int(col["length"][keep].max()) if len(keep) else 0,
            "mean_example_length": float(col["length"][keep].mean()) if len(keep) else 0.0,
        }
        stats[f"num_{split}"] = int(len(keep))
        if len(keep):  # an empty split is not written (save_to_disk of 0 rows does not load back)
            tok.select(keep).save_to_disk(str(tmp / split))
    for k in ("num_truncated", "num_prompt_truncated", "num_dropped", "num_boundary_fallback"):
        stats[k] = stats["train"][k] + stats["val"][k]
    del tok, table
    (tmp / "tokenized.arrow").unlink(missing_ok=True)
    # the manifest a later run checks the entry against (open_cache): a truncated or missing file is rebuilt
    stats["files"] = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_json_atomic(tmp / "stats.json", stats, indent=1)
