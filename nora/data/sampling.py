"""Deterministic, resumable batch sampling shared by every task.

A batch sampler here is an iterable of index lists with ``set_epoch(epoch)`` (reshuffles
deterministically from ``(seed, epoch)``) and ``set_start(batch)`` (skip the first ``batch``
batches of the epoch, for exact resume mid-epoch). With ``num_replicas > 1`` each rank gets a
disjoint, equally long share of every epoch's batches (data-parallel training).
"""
from __future__ import annotations

import torch


class ShuffledBatchSampler:
    """Random permutation per epoch, cut into batches (the last partial batch is dropped when training)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 num_replicas: int = 1, rank: int = 0):
        if n <= 0:
            raise ValueError("cannot sample batches from an empty dataset")
        self.n, self.batch_size, self.seed, self.shuffle = n, int(batch_size), int(seed), shuffle
        self.drop_last, self.num_replicas, self.rank = drop_last, int(num_replicas), int(rank)
        self.epoch, self.start = 0, 0
        if self.drop_last and self._total_batches() < self.num_replicas:
            raise ValueError(f"{n} examples make fewer than one batch of {batch_size} per rank; "
                             "lower trainer.batch_size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, batch: int) -> None:
        self.start = int(batch)

    def _total_batches(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __len__(self) -> int:
        return self._total_batches() // self.num_replicas if self.drop_last else \
            -(-self._total_batches() // self.num_replicas)

    def _batches(self) -> list[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        per_rank = len(self)
        return batches[self.rank::self.num_replicas][:per_rank]

    def __iter__(self):
        yield from self._batches()[self.start:]
