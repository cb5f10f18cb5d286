"""Image-classification data: torchvision CIFAR-10/100 and scikit-learn's digits (offline demo).

Transforms follow the usual ViT fine-tuning recipe: resize to the model's input size with its
pretrained interpolation, random horizontal flip (and an optional padded random crop) for training,
and normalisation with the mean/std of the model's pretrained config (timm ``pretrained_cfg``).

Augmentation is reproducible and resumable: :class:`EpochSeeded` seeds each sample's random
transform from ``(seed, epoch, index)`` in an isolated RNG, so an image gets the same augmentation
whatever the worker count, and a run resumed mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from nora.data.config import vision_dataset_config
from nora.errors import UserError

CIFAR_FILES = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


@dataclass
class VisionData:
    train: Dataset
    eval: Dataset
    num_classes: int
    input_size: int
    calibration: Dataset  # training images with the evaluation transforms (NoRA calibrated init)
    name: str = ""


def interpolation_mode(name: str | None) -> T.InterpolationMode:
    return {
        "bilinear": T.InterpolationMode.BILINEAR,
        "bicubic": T.InterpolationMode.BICUBIC,
        "nearest": T.InterpolationMode.NEAREST,
    }.get(name or "bicubic", T.InterpolationMode.BICUBIC)


def build_transforms(
    pretrained_cfg: dict, input_size: int, train: bool, hflip: bool = True, crop_padding: int = 0
) -> T.Compose:
    """ViT fine-tuning transforms for uint8/PIL images -> normalised float tensors."""
    mean = tuple(pretrained_cfg.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(pretrained_cfg.get("std", (0.5, 0.5, 0.5)))
    ops: list = [
        T.ToImage(),
        T.Resize(
            (input_size, input_size),
            interpolation=interpolation_mode(pretrained_cfg.get("interpolation")),
            antialias=True,
        ),
    ]
    if train:
        if crop_padding:
            ops.append(T.RandomCrop(input_size, padding=crop_padding, padding_mode="reflect"))
        if hflip:
            ops.append(T.RandomHorizontalFlip())
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    return T.Compose(ops)


class EpochSeeded(Dataset):
    """Applies ``transform`` to ``base[i]`` with an RNG seeded from (seed, epoch, i) only."""

    def __init__(self, base: Dataset, transform, seed: int):
        self.base, self.transform, self.seed, self.epoch = base, transform, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i))
            return self.transform(img), label


class TensorImages(Dataset):
    """uint8 images (N, C, H, W) and int labels held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class Subset(Dataset):
    def __init__(self, base: Dataset, n: int):
        self.base, self.n = base, min(int(n), len(base))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i >= self.n:
            raise IndexError(i)
        return self.base[i]


def _without_md5(cls):
    """A torchvision CIFAR class that checks the batch files exist instead of their md5 sums."""
    import pickle

    def check(self):
        return all((Path(self.root) / self.base_folder / f).exists() for f, _ in self.train_list + self.test_list)

    def load_meta(self):
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        if not path.exists():
            raise RuntimeError(f"metadata file {path} not found")
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
        self.classes = data[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return type(cls.__name__, (cls,), {"_check_integrity": check, "_load_meta": load_meta})


def archive_damage(path: Path) -> str | None:
    """Why the tar archive ``path`` cannot be read to its end (``"truncated (...)"`` when the data stops early, as
    after an interrupted download; ``"corrupt (...)"`` otherwise), or None when every member reads back."""
    import tarfile

    try:
        with tarfile.open(path) as tar:
            for member in tar:  # walking the members decompresses the whole stream
                if member.isfile():
                    tar.extractfile(member).read()
    except EOFError as exc:
        return f"truncated ({path.stat().st_size} bytes; {exc})"
    except (tarfile.TarError, OSError) as exc:
        kind = "truncated" if "unexpected end" in str(exc) else "corrupt"
        return f"{kind} ({path.stat().st_size} bytes; {type(exc).__name__}: {exc})"
    return None


def load_cifar(name: str, root: str | os.PathLike, download: bool, verify_md5: bool = True) -> tuple[Dataset, Dataset]:
    """torchvision CIFAR train/test sets; a missing dataset ends in one actionable message.

    ``verify_md5=False`` accepts batch files whose checksums differ from the official release (data
    written in the same pickle format by tests or by a user's own conversion); loading itself is
    still torchvision's.
    """
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    if not verify_md5:
        cls = _without_md5(cls)
    root = Path(root)
    folder, archive = CIFAR_FILES[name], CIFAR_ARCHIVES[name]
    try:
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=False)
    except Exception as exc:  # no files and no download possible (offline), or corrupt files
        reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
        damage = archive_damage(root / archive) if (root / archive).is_file() else None
        if damage:
            raise UserError(
                f"{root / archive} is {damage}; delete it and download it again (or put the extracted "
                f"{folder}/ folder under {root}/)"
            ) from None
        if (root / folder).is_dir() and any((root / folder).iterdir()):
            raise UserError(
                f"{name} files under {root}/{folder} could not be read ({reason.splitlines()[0]}); "
                f"replace them with the official {archive} contents"
            ) from None
        raise UserError(
            f"{name} not found under {root}/{folder} and could not be downloaded ({reason.splitlines()[0]}); "
            f"put the extracted {folder}/ folder (or {archive}, which torchvision extracts) under {root}/, "
            f"or point dataset.root (or $NORA_DATA) at the folder holding it"
        ) from None


def _stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask selecting ``fraction`` of each class (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        mask[idx[: int(round(len(idx) * fraction))]] = True
    return mask


def load_digits(
    classes: list[int],
    test_fraction: float,
    transform: str = "none",
    split_seed: int = 0,
    eval_split: str = "test",
    validation_fraction: float = 0.2,
) -> tuple[TensorImages, TensorImages]:
    """scikit-learn's 8x8 handwritten digits (shipped with the package) as 3-channel uint8 images.

    ``classes`` selects and relabels digits (0..K-1 in the given order); ``transform`` applies a fixed
    domain shift to every image (``none``, ``rot90``, ``invert``, ``transpose``); the train/test split
    is stratified and fixed by ``split_seed`` (independent of the run seed). ``eval_split="validation"``
    evaluates on ``validation_fraction`` of the training images instead (for tuning).
    """
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = torch.from_numpy((d.images / 16.0 * 255.0).round().astype(np.uint8))  # (N, 8, 8)
    target = torch.from_numpy(d.target)
    keep = torch.zeros_like(target, dtype=torch.bool)
    labels = torch.full_like(target, -1)
    for new, c in enumerate(classes):
        sel = target == int(c)
        keep |= sel
        labels[sel] = new
    images, labels = images[keep], labels[keep]
    if transform == "rot90":
        images = torch.rot90(images, 1, dims=(1, 2))
    elif transform == "invert":
        images = 255 - images
    elif transform == "transpose":
        images = images.transpose(1, 2)
    elif transform != "none":
        raise UserError(f"unknown digits transform {transform!r}; valid: none, rot90, invert, transpose")
    images = images[:, None].expand(-1, 3, -1, -1).contiguous()
    test = _stratified_split(labels, test_fraction, split_seed)
    if eval_split == "test":
        return TensorImages(images[~test], labels[~test]), TensorImages(images[test], labels[test])
    if eval_split != "validation":
        raise UserError(f"unknown dataset.eval_split {eval_split!r}; valid: test, validation")
    # hyper-parameter tuning: hold out part of the training images, never touching the test images
    images, labels = images[~test], labels[~test]
    val = _stratified_split(labels, validation_fraction, split_seed + 1)
    return TensorImages(images[~val], labels[~val]), TensorImages(images[val], labels[val])


def load_vision_dataset(dataset_cfg) -> tuple[Dataset, Dataset, int]:
    """Raw train/eval images and the class count (no transforms yet): fails early if data is missing."""
    dataset_cfg = vision_dataset_config(dataset_cfg)
    source = dataset_cfg.source
    if source in ("torchvision_cifar10", "torchvision_cifar100"):
        name = source.split("_", 1)[1]
        train, test = load_cifar(name, dataset_cfg.root, dataset_cfg.download, dataset_cfg.verify_md5)
        num_classes = 10 if name == "cifar10" else 100
    elif source == "sklearn_digits":
        classes = list(dataset_cfg.classes)
        train, test = load_digits(
            classes,
            dataset_cfg.test_fraction,
            dataset_cfg.transform,
            dataset_cfg.split_seed,
            dataset_cfg.eval_split,
            dataset_cfg.validation_fraction,
        )
        num_classes = len(classes)
    else:
        raise UserError(
            f"unknown vision dataset source {source!r}; valid: torchvision_cifar10, "
            "torchvision_cifar100, sklearn_digits"
        )
    if int(dataset_cfg.num_classes) != num_classes:
        raise UserError(f"dataset.num_classes={dataset_cfg.num_classes} but {dataset_cfg.name} has {num_classes}")
    if dataset_cfg.limit_train:
        train = Subset(train, dataset_cfg.limit_train)
    if dataset_cfg.limit_eval:
        test = Subset(test, dataset_cfg.limit_eval)
    return train, test, num_classes


def build_vision_data(
    dataset_cfg, pretrained_cfg: dict, input_size: int, seed: int, raw: tuple[Dataset, Dataset, int] | None = None
) -> VisionData:
    """Train/eval datasets with the model's transforms for a dataset config (``configs/dataset/*.yaml``)."""
    dataset_cfg = vision_dataset_config(dataset_cfg)
    train, test, num_classes = raw if raw is not None else load_vision_dataset(dataset_cfg)
    aug = dataset_cfg.augment
    train_tf = build_transforms(pretrained_cfg, input_size, True, aug.hflip, aug.crop_padding)
    eval_tf = build_transforms(pretrained_cfg, input_size, False)
    return VisionData(
        EpochSeeded(train, train_tf, seed),
        EpochSeeded(test, eval_tf, seed),
        num_classes,
        input_size,
        EpochSeeded(train, eval_tf, seed),
        dataset_cfg.name,
    )
