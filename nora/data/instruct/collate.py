"""Batching: pad (or concatenate packed rows into) a batch, count its tokens, wire a DataLoader."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import torch

from nora.data.instruct.config import DataError, InstructDataConfig
from nora.data.instruct.dataset import PackedInstructDataset
from nora.data.instruct.tokenization import IGNORE_INDEX
from nora.data.sampling import LengthGroupedBatchSampler


class InstructCollator:
    """Pad a list of ``{"input_ids", "labels"}`` to the longest (optionally a multiple of
    ``pad_to_multiple_of``): ``input_ids`` with ``pad_token_id``, ``attention_mask`` 0, ``labels`` -100.

    Items with ``position_ids`` (from :class:`PackedInstructDataset`), or any batch when ``padding_free``,
    are concatenated into one row ``[1, total]`` with ``position_ids`` restarting per example and no
    ``attention_mask`` (no padding, so ``pad_to_multiple_of`` does not apply; see the module docstring)."""

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int | None = None,
        padding_side: str = "right",
        padding_free: bool = False,
    ):
        if padding_side not in ("right", "left"):
            raise ValueError("padding_side must be 'right' or 'left'")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = int(pad_to_multiple_of) if pad_to_multiple_of else None
        self.padding_side = padding_side
        self.padding_free = padding_free

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs) -> "InstructCollator":
        """Pad with the tokenizer's pad token, or its EOS when it has none (LLaMA-3): padded positions are
        masked out of attention and loss either way."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError("the tokenizer has neither a pad nor an EOS token")
        return cls(pad, **kwargs)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("empty batch")
        if self.padding_free or "position_ids" in features[0]:
            return self._flatten(features)
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(features)
        ids = torch.full((b, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((b, longest), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            sl = slice(0, n) if self.padding_side == "right" else slice(longest - n, longest)
            ids[i, sl] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, sl] = torch.as_tensor(f["labels"], dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @staticmethod
    def _flatten(features) -> dict[str, torch.Tensor]:
        ids = [t for f in features for t in f["input_ids"]]
        labels = [t for f in features for t in f["labels"]]
        pos = [p for f in features for p in (f["position_ids"] if "position_ids" in f else range(len(f["input_ids"])))]
        as_row = lambda x: torch.as_tensor(x, dtype=torch.long).unsqueeze(0)  # noqa: E731
        return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(pos)}


class BatchTokens(NamedTuple):
    tokens: int  # non-pad tokens (what the model processes)
    supervised: int  # tokens with a label (what the loss covers)


def tokens_in_batch(batch: Mapping[str, torch.Tensor]) -> BatchTokens:
    """Non-pad and supervised token counts of a collated batch, for tokens/s logging."""
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
    return BatchTokens(tokens, int((batch["labels"] != IGNORE_INDEX).sum()))


def build_dataloader(
    dataset,
    cfg: InstructDataConfig,
    tokenizer,
    batch_size: int,
    *,
    train: bool = True,
    seed: int = 0,
    num_replicas: int | None = None,
    rank: int | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """DataLoader with a :class:`LengthGroupedBatchSampler` (``loader.batch_sampler``: call ``set_epoch`` /
    ``set_start`` on it) and an :class:`InstructCollator` following ``cfg`` (group_by_length,
    pad_to_multiple_of, mega_batch_mult). Evaluation (``train=False``) keeps a fixed length-sorted order."""
    sampler = LengthGroupedBatchSampler(
        dataset.lengths,
        batch_size,
        seed=seed,
        shuffle=train,
        group_by_length=(cfg.group_by_length or not train) and not isinstance(dataset, PackedInstructDataset),
        num_replicas=num_replicas,
        rank=rank,
        drop_last=drop_last,
        mega_batch_mult=cfg.mega_batch_mult,
    )
    collate = InstructCollator.from_tokenizer(tokenizer, pad_to_multiple_of=cfg.pad_to_multiple_of)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
