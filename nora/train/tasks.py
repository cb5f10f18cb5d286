"""What a batch means for each model family: the loss, the evaluation metrics, the units counted."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationTask:
    """Images -> class logits; cross-entropy; top-1 accuracy. Batches are ``(images, labels)``."""

    unit = "images"
    metric = "accuracy"  # higher is better

    def to_device(self, batch, device, non_blocking=False):
        x, y = batch
        return x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def units(self, batch) -> int:
        return int(batch[1].shape[0])

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = model(x).float()
        return {"loss_sum": F.cross_entropy(logits, y, reduction="sum"),
                "correct": (logits.argmax(-1) == y).sum(), "count": torch.tensor(y.shape[0], device=y.device)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1)
        return {"accuracy": 100.0 * sums["correct"] / n, "loss": sums["loss_sum"] / n}


class CausalLMTask:
    """Next-token prediction on instruction data; the loss covers the response tokens (labels != -100)."""

    unit = "tokens"
    metric = "loss"  # lower is better

    def to_device(self, batch, device, non_blocking=False):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return model(**batch).loss

    def units(self, batch) -> int:
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits = out.logits[:, :-1].float()
        target = labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                               reduction="sum")
        n = (target != -100).sum()
        correct = ((logits.argmax(-1) == target) & (target != -100)).sum()
        return {"loss_sum": loss, "count": n, "correct": correct}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        import math

        n = max(sums["count"], 1)
        loss = sums["loss_sum"] / n
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "token_accuracy": 100.0 * sums["correct"] / n}
