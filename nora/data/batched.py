"""The batched (device-resident) image path: uint8 images held as one tensor on the training device,
augmented a whole batch at a time with tensor ops.

On a GPU this removes the CPU decode/resize bottleneck of per-sample PIL transforms (CIFAR-100's
50,000 training images are 150 MB of uint8). The augmentation has the same semantics as the
per-sample path in :mod:`nora.data.vision` (resize to the model's input size with its
interpolation, optional reflect-padded random crop, random horizontal flip, ToDtype + Normalize with
the pretrained mean/std), in the same order, with the resize rounded to uint8 as torchvision does
for uint8 images. Random parameters are drawn on the CPU from a generator seeded by
``(seed, epoch, batch index)``, so a batch is augmented identically on any device and after resume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from nora.data.vision import Subset, TensorImages, interpolation_mode


def as_uint8_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, C, H, W), labels int64 (N,)) of an in-memory dataset (CIFAR, digits, subsets)."""
    n = None
    if isinstance(dataset, Subset):
        n, dataset = dataset.n, dataset.base
    if isinstance(dataset, TensorImages):
        images, labels = dataset.images, dataset.labels
    elif hasattr(dataset, "data") and hasattr(dataset, "targets"):  # torchvision CIFAR: (N, H, W, C) numpy
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(dataset.targets)
    else:
        raise TypeError(f"{type(dataset).__name__} is not an in-memory image dataset")
    if n is not None:
        images, labels = images[:n], labels[:n]
    return images.to(torch.uint8), labels.long()


class BatchedAugment:
    """Resize -> [reflect-pad + random crop] -> [random hflip] -> scale to [0, 1] -> normalise."""

    def __init__(
        self,
        input_size: int,
        mean,
        std,
        interpolation: str = "bicubic",
        train: bool = True,
        hflip: bool = True,
        crop_padding: int = 0,
    ):
        self.size = int(input_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

        self.interpolation = interpolation_mode(interpolation)
        self.train, self.hflip, self.pad = train, hflip, int(crop_padding)

    def params(self, n: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Random crop offsets and flip flags for ``n`` images (drawn on the CPU)."""
        out = {}
        if self.train and self.pad:
            out["top"] = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
            out["left"] = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        if self.train and self.hflip:
            out["flip"] = torch.rand(n, generator=generator) < 0.5
        return out

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> resized float32 on the 0..255 scale: torchvision's own (batched) uint8 resize, so the
        result is exactly the per-sample path's on every device (native uint8 kernels on the CPU,
        float + clamp + round on GPUs)."""
        if images.shape[-2:] != (self.size, self.size):
            from torchvision.transforms.v2 import functional as TF

            images = TF.resize(images, [self.size, self.size], interpolation=self.interpolation, antialias=True)
        return images.float()

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.resize(images)
        b = x.shape[0]
        if "top" in params:
            p, s = self.pad, self.size
            xp = F.pad(x, (p, p, p, p), mode="reflect")
            ar = torch.arange(s, device=x.device)
            rows = params["top"].to(x.device)[:, None] + ar  # (B, S)
            cols = params["left"].to(x.device)[:, None] + ar
            bidx = torch.arange(b, device=x.device)[:, None, None]
            x = xp.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if "flip" in params:
            f = params["flip"].to(x.device).view(-1, 1, 1, 1)
            x = torch.where(f, x.flip(-1), x)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return ((x / 255.0) - mean) / std

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(images, self.params(images.shape[0], generator))


class DeviceBatches:
    """Iterates ``batch_sampler`` over device-resident uint8 images, yielding augmented batches."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, batch_sampler, augment: BatchedAugment, seed: int, epoch: int
    ):
        self.images, self.labels, self.sampler = images, labels, batch_sampler
        self.augment, self.seed, self.epoch = augment, int(seed), int(epoch)

    def __len__(self) -> int:
        return len(self.sampler) - getattr(self.sampler, "start", 0)

    def __iter__(self):
        start = getattr(self.sampler, "start", 0)
        for i, idx in enumerate(self.sampler, start=start):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
            index = torch.as_tensor(idx, device=self.images.device)
            yield self.augment(self.images[index], g), self.labels[index]
