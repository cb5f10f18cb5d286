"""What a batch means for each model family: the loss, the evaluation metrics, the units counted.

The loss of an optimizer step is the sum of the per-item losses (an image; a supervised token) over all its
micro-batches and ranks divided by their total count, whatever ``grad_accum`` and the world size: the loop
counts the step's items first (:meth:`items`, summed over ranks) and every micro-batch returns its loss *sum*
divided by that count (:meth:`loss`, ``normalizer``). Supervised tokens are what transformers calls
``num_items_in_batch``.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # labels of prompt and padding tokens (no loss)


class Task(Protocol):
    """What the training loop asks of a model family (see the module docstring)."""

    unit: str  # what throughput counts: images, tokens
    metric: str  # the evaluation metric that picks the best step
    higher_is_better: bool

    def to_device(self, batch, device, non_blocking: bool = False): ...
    def items(self, batch) -> int: ...
    def loss(self, model: nn.Module, batch, normalizer) -> torch.Tensor: ...
    def units(self, batch) -> int: ...
    def eval_sums(self, model: nn.Module, batch) -> dict[str, torch.Tensor]: ...
    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...


class ClassificationTask:
    """Images -> class logits; cross-entropy; top-1 accuracy. Batches are ``(images, labels)``."""

    unit = "images"
    metric = "accuracy"
    higher_is_better = True

    def to_device(self, batch, device, non_blocking=False):
        x, y = batch
        return x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)

    def items(self, batch) -> int:
        """Loss items in a batch: its images."""
        return int(batch[1].shape[0])

    def loss(self, model: nn.Module, batch, normalizer) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum") / normalizer

    def units(self, batch) -> int:
        return int(batch[1].shape[0])

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = model(x).float()
        return {
            "loss_sum": F.cross_entropy(logits, y, reduction="sum"),
            "correct": (logits.argmax(-1) == y).sum(),
            "count": torch.tensor(y.shape[0], device=y.device),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1)
        return {"accuracy": 100.0 * sums["correct"] / n, "loss": sums["loss_sum"] / n}


class CausalLMTask:
    """Next-token prediction on instruction data; the loss covers the response tokens (labels != -100)."""

    unit = "tokens"
    metric = "loss"
    higher_is_better = False

    def to_device(self, batch, device, non_blocking=False):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}

    def items(self, batch) -> int:
        """Loss items in a batch: its supervised next-token targets (counted on the host copy)."""
        return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch, normalizer) -> torch.Tensor:
        # transformers sums the token losses and divides by num_items_in_batch when it is given
        return model(**batch, num_items_in_batch=normalizer).loss

    def units(self, batch) -> int:
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits = out.logits[:, :-1].float()
        target = labels[:, 1:]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        n = (target != IGNORE_INDEX).sum()
        correct = ((logits.argmax(-1) == target) & (target != IGNORE_INDEX)).sum()
        return {"loss_sum": loss, "count": n, "correct": correct}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1)
        loss = sums["loss_sum"] / n
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": 100.0 * sums["correct"] / n}
