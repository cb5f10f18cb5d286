"""Synthetic data in the real on-disk formats, for tests and benchmarks (no download)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_cifar(
    root: str | Path,
    name: str = "cifar10",
    n_train: int = 200,
    n_test: int = 100,
    seed: int = 0,
    num_classes: int | None = None,
) -> Path:
    """CIFAR-10/100 python pickle batches exactly as the official archives hold them.

    Images carry a class-dependent colour signal plus noise so that a model can learn something.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    k = num_classes or (10 if name == "cifar10" else 100)

    def make(n):
        labels = rng.integers(0, k, size=n)
        base = (labels[:, None] * 37 % 255).astype(np.float64)
        data = np.clip(rng.normal(base, 40.0, size=(n, 3072)), 0, 255).astype(np.uint8)
        data[:, :1024] = np.clip(data[:, :1024].astype(int) + (labels[:, None] % 3) * 60, 0, 255)
        return data, labels.tolist()

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        per = -(-n_train // 5)
        for i in range(5):
            data, labels = make(min(per, n_train - i * per))
            with open(folder / f"data_batch_{i + 1}", "wb") as f:
                pickle.dump(
                    {
                        "batch_label": f"training batch {i + 1} of 5".encode(),
                        "labels": labels,
                        "data": data,
                        "filenames": [b"x.png"] * len(labels),
                    },
                    f,
                )
        data, labels = make(n_test)
        with open(folder / "test_batch", "wb") as f:
            pickle.dump(
                {
                    "batch_label": b"testing batch 1 of 1",
                    "labels": labels,
                    "data": data,
                    "filenames": [b"x.png"] * len(labels),
                },
                f,
            )
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump(
                {"label_names": [f"class{i}".encode() for i in range(10)], "num_cases_per_batch": per, "num_vis": 3072},
                f,
            )
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test)):
            data, labels = make(n)
            with open(folder / split, "wb") as f:
                pickle.dump(
                    {
                        "filenames": [b"x.png"] * n,
                        "batch_label": split.encode(),
                        "fine_labels": labels,
                        "coarse_labels": [label // 5 for label in labels],
                        "data": data,
                    },
                    f,
                )
        with open(folder / "meta", "wb") as f:
            pickle.dump(
                {
                    "fine_label_names": [f"c{i}".encode() for i in range(100)],
                    "coarse_label_names": [f"s{i}".encode() for i in range(20)],
                },
                f,
            )
    return root
