"""Deterministic, resumable batch sampling shared by every task.

A batch sampler here is an iterable of index lists with ``set_epoch(epoch)`` (reshuffles
deterministically from ``(seed, epoch)``) and ``set_start(batch)`` (skip the first ``batch``
batches of the epoch, for exact resume mid-epoch). With ``num_replicas > 1`` each rank gets a
disjoint, equally long share of every epoch's batches (data-parallel training).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from nora.errors import UserError


class DataSizeError(UserError, ValueError):
    """Too few examples for one batch per rank: one line (a ValueError for callers that catch those)."""


class ShuffledBatchSampler:
    """Random permutation per epoch, cut into batches (the last partial batch is dropped when training)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if n <= 0:
            raise ValueError("cannot sample batches from an empty dataset")
        self.n, self.batch_size, self.seed, self.shuffle = n, int(batch_size), int(seed), shuffle
        self.drop_last, self.num_replicas, self.rank = drop_last, int(num_replicas), int(rank)
        self.epoch, self.start = 0, 0
        if self.drop_last and self._total_batches() < self.num_replicas:
            raise DataSizeError(
                f"{n} examples make fewer than one batch of {batch_size} per rank; lower trainer.batch_size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, batch: int) -> None:
        self.start = int(batch)

    def _total_batches(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __len__(self) -> int:
        return (
            self._total_batches() // self.num_replicas
            if self.drop_last
            else -(-self._total_batches() // self.num_replicas)
        )

    def _batches(self) -> list[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        batches = [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        per_rank = len(self)
        return batches[self.rank :: self.num_replicas][:per_rank]

    def __iter__(self):
        yield from self._batches()[self.start :]


def _replica_and_rank(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    dist = torch.distributed
    on = dist.is_available() and dist.is_initialized()
    r = int(num_replicas) if num_replicas is not None else (dist.get_world_size() if on else 1)
    k = int(rank) if rank is not None else (dist.get_rank() if on else 0)
    if not 0 <= k < r:
        raise ValueError(f"rank {k} outside 0..{r - 1}")
    return r, k


class LengthGroupedBatchSampler:
    """Batches of similar-length examples, deterministic per ``(seed, epoch)``, resumable, distributed.

    Each epoch: a permutation of all examples (``numpy.random.default_rng([seed, epoch])``) is cut into
    mega-batches of ``mega_batch_mult`` global batches (``batch_size * num_replicas`` examples); each mega-batch
    is sorted by length (longest first) and cut into global batches; the order of the global batches is
    shuffled; rank ``r`` takes the ``r``-th slice of ``batch_size`` examples of every global batch, so all
    ranks get the same number of batches, of similar lengths at each step, with disjoint examples. The global
    batches depend on ``batch_size * num_replicas`` only: one process with ``batch_size=B*R`` sees the union
    of what ``R`` ranks with ``B`` see. ``group_by_length=False`` gives plain random batches;
    ``shuffle=False`` (evaluation) sorts the whole set by length and keeps that order.

    The last incomplete global batch is dropped with ``drop_last``; otherwise it is kept (split evenly
    between ranks) after repeating the first ``(-n) % num_replicas`` examples of the epoch's permutation.
    ``set_epoch(epoch)`` reshuffles; ``set_start(k)`` (or ``start_batch``) skips the first ``k`` batches of
    the epoch (exact resume); ``len()`` counts the batches still to come. The interface matches
    :class:`ShuffledBatchSampler`.
    """

    def __init__(
        self,
        lengths,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        mega_batch_mult: int = 50,
        start_batch: int = 0,
    ):
        lengths = getattr(lengths, "lengths", lengths)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or self.lengths.size == 0:
            raise ValueError("LengthGroupedBatchSampler needs a non-empty 1-d sequence of lengths")
        if int(batch_size) < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), bool(shuffle)
        self.group_by_length, self.drop_last = bool(group_by_length), bool(drop_last)
        self.mega_batch_mult = int(mega_batch_mult)
        self.num_replicas, self.rank = _replica_and_rank(num_replicas, rank)
        self.epoch, self.start = 0, int(start_batch)
        if self.num_batches == 0:
            raise ValueError(
                f"{self.lengths.size} examples make no batch of {self.batch_size} x "
                f"{self.num_replicas} ranks with drop_last; lower the batch size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, batch: int) -> None:
        self.start = int(batch)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    @property
    def num_batches(self) -> int:
        """Batches per rank in a full epoch."""
        n, g, r = self.lengths.size, self.global_batch_size, self.num_replicas
        return n // g if self.drop_last else -(-(n + (-n) % r) // g)

    def __len__(self) -> int:
        return max(self.num_batches - self.start, 0)

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The epoch's global batches (all ranks' examples, rank slices in order)."""
        epoch = self.epoch if epoch is None else int(epoch)
        n, g, r = self.lengths.size, self.global_batch_size, self.num_replicas
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.drop_last:
            order = order[: (n // g) * g]
        elif n % r:
            order = np.concatenate([order, order[: (-n) % r]])
        if self.group_by_length:
            mega = len(order) if not self.shuffle else g * self.mega_batch_mult
            chunks = [order[i : i + mega] for i in range(0, len(order), mega)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        batches = [order[i : i + g] for i in range(0, len(order), g)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        r = self.num_replicas
        for gb in self.global_batches()[self.start :]:
            b = len(gb) // r
            yield gb[self.rank * b : (self.rank + 1) * b].tolist()


def padding_waste(lengths, batches: Sequence[Sequence[int]], pad_to_multiple_of: int | None = None) -> float:
    """Share of pad tokens when ``batches`` (index lists) are padded to their longest member."""
    lengths = np.asarray(lengths)
    real = padded = 0
    for b in batches:
        ls = lengths[np.asarray(b)]
        t = int(ls.max())
        if pad_to_multiple_of:
            t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
        real += int(ls.sum())
        padded += t * len(ls)
    return 1.0 - real / max(padded, 1)
