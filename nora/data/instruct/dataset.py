"""Tokenised examples as torch datasets, one example per item or several packed into one row."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch


class InstructDataset(torch.utils.data.Dataset):
    """Tokenised examples: ``ds[i] -> {"input_ids": list[int], "labels": list[int]}``.

    ``lengths`` (numpy, tokens per example) feeds the sampler; ``num_examples`` (= ``len``), ``num_total``
    (before dropping), ``num_truncated``, ``num_prompt_truncated``, ``num_dropped`` and ``num_tokens`` /
    ``num_supervised_tokens`` describe it. ``hf_dataset`` is the underlying ``datasets.Dataset``."""

    def __init__(self, hf_dataset, meta: Mapping[str, Any] | None = None, split: str = "train"):
        if getattr(hf_dataset, "_indices", None) is not None:
            hf_dataset = hf_dataset.flatten_indices()
        self.hf_dataset = hf_dataset.select_columns(["input_ids", "labels", "length"])
        self.split = split
        self.lengths = hf_dataset.data.column("length").to_numpy().astype(np.int64)
        meta = dict(meta or {})
        self.num_examples = len(hf_dataset)
        self.num_total = int(meta.get("num_total", self.num_examples))
        self.num_truncated = int(meta.get("num_truncated", 0))
        self.num_prompt_truncated = int(meta.get("num_prompt_truncated", 0))
        self.num_dropped = int(meta.get("num_dropped", 0))
        self.num_boundary_fallback = int(meta.get("num_boundary_fallback", 0))
        self.num_tokens = int(self.lengths.sum())
        self.num_supervised_tokens = int(meta.get("num_supervised_tokens", 0))

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i) -> dict[str, list[int]]:
        row = self.hf_dataset[int(i)]
        return {"input_ids": row["input_ids"], "labels": row["labels"]}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, list[int]]]:
        cols = self.hf_dataset[[int(i) for i in indices]]
        return [{"input_ids": a, "labels": b} for a, b in zip(cols["input_ids"], cols["labels"])]

    def __repr__(self) -> str:
        return (
            f"InstructDataset(split={self.split}, examples={self.num_examples}, truncated={self.num_truncated}, "
            f"dropped={self.num_dropped}, tokens={self.num_tokens})"
        )


def pack_lengths(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example lengths into rows of at most ``max_length`` tokens;
    deterministic. Returns the example indices of each row."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() > max_length:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit a row of {max_length}")
    count = np.zeros(max_length + 1, dtype=np.int64)  # rows with exactly c tokens free
    by_free: list[list[int]] = [[] for _ in range(max_length + 1)]
    rows: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        nz = np.flatnonzero(count[n:])
        if nz.size:
            free = n + int(nz[0])
            r = by_free[free].pop()
            count[free] -= 1
        else:
            free, r = max_length, len(rows)
            rows.append([])
        rows[r].append(int(i))
        by_free[free - n].append(r)
        count[free - n] += 1
    return rows


class PackedInstructDataset(torch.utils.data.Dataset):
    """Examples of an :class:`InstructDataset` packed into rows of at most ``max_length`` tokens.

    Items carry ``position_ids`` restarting at 0 for each example; :class:`InstructCollator` turns a batch of
    them into one padding-free row (see the module docstring for the attention isolation)."""

    def __init__(self, dataset: InstructDataset, max_length: int):
        self.base = dataset
        self.rows = pack_lengths(dataset.lengths, max_length)
        self.lengths = np.array([int(dataset.lengths[r].sum()) for r in self.rows], dtype=np.int64)
        for k in (
            "num_total",
            "num_truncated",
            "num_prompt_truncated",
            "num_dropped",
            "num_tokens",
            "num_supervised_tokens",
            "num_boundary_fallback",
        ):
            setattr(self, k, getattr(dataset, k))
        self.num_examples = dataset.num_examples
        self.max_length = max_length

    @property
    def fill(self) -> float:
        """Share of the rows' ``max_length`` slots holding tokens."""
        return float(self.lengths.sum() / max(len(self.rows) * self.max_length, 1))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i) -> dict[str, list[int]]:
        exs = self.base.__getitems__(self.rows[int(i)])
        return {
            "input_ids": [t for e in exs for t in e["input_ids"]],
            "labels": [t for e in exs for t in e["labels"]],
            "position_ids": [p for e in exs for p in range(len(e["input_ids"]))],
        }
