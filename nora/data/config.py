"""The ``dataset`` config group (``configs/dataset/*.yaml``) as typed schemas: vision datasets by ``source``,
instruction data by :class:`nora.data.instruct.InstructDataConfig` (its own schema, one home)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from nora.data.instruct import InstructDataConfig
from nora.errors import UserError
from nora.schema import at_least, load, nested, one_of, require

DIGIT_TRANSFORMS = ("none", "rot90", "invert", "transpose")
EVAL_SPLITS = ("test", "validation")
INSTRUCT_IGNORE = ("family",)  # config-group keys the training spine reads itself, not data-loading settings


@dataclass
class AugmentConfig:
    hflip: bool = True
    crop_padding: int = 0  # pixels of padding for a random crop at the model's input size (0: off)

    def __post_init__(self):
        with nested("augment"):
            at_least("crop_padding", self.crop_padding, 0)


@dataclass
class _VisionDataset:
    name: str = ""
    family: str = "vision"
    source: str = ""
    num_classes: int = 10
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    limit_train: Optional[int] = None  # only the first N training images (smoke runs)
    limit_eval: Optional[int] = None

    def __post_init__(self):
        at_least("num_classes", self.num_classes, 2)
        at_least("limit_train", self.limit_train, 1, allow_none=True)
        at_least("limit_eval", self.limit_eval, 1, allow_none=True)


@dataclass
class CifarDatasetConfig(_VisionDataset):
    root: str = "data"
    download: bool = True
    verify_md5: bool = True


@dataclass
class DigitsDatasetConfig(_VisionDataset):
    classes: List[int] = field(default_factory=lambda: list(range(10)))
    transform: str = "none"
    test_fraction: float = 0.3
    split_seed: int = 0
    eval_split: str = "test"
    validation_fraction: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        one_of("transform", self.transform, DIGIT_TRANSFORMS)
        one_of("eval_split", self.eval_split, EVAL_SPLITS)
        require(0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "must be in (0, 1)")
        require(0 < self.validation_fraction < 1, "validation_fraction", self.validation_fraction, "must be in (0, 1)")
        classes = list(self.classes)
        require(
            len(classes) >= 2 and len(set(classes)) == len(classes) and all(0 <= c <= 9 for c in classes),
            "classes",
            classes,
            "must be two or more distinct digits 0-9",
        )


VISION_SOURCES = {
    "torchvision_cifar10": CifarDatasetConfig,
    "torchvision_cifar100": CifarDatasetConfig,
    "sklearn_digits": DigitsDatasetConfig,
}


def _vision_dataset(dataset_cfg):
    source = dataset_cfg.get("source")
    if source not in VISION_SOURCES:
        raise UserError(f"dataset.source={source!r}; valid: {', '.join(VISION_SOURCES)}")
    return load(VISION_SOURCES[source], dataset_cfg, "dataset")


def _instruct_dataset(dataset_cfg):
    return InstructDataConfig.from_dict(dataset_cfg, ignore=INSTRUCT_IGNORE)


# the dataset schema of each model family (nora.models.config.FAMILIES; tests/test_registry.py keeps them equal)
DATASET_SCHEMAS = {"vision": _vision_dataset, "causal_lm": _instruct_dataset}


def check_dataset(dataset_cfg, family: str):
    """The typed dataset config of a ``family`` model: a vision schema instance, or an ``InstructDataConfig``."""
    one_of("model.family", family, DATASET_SCHEMAS)
    return DATASET_SCHEMAS[family](dataset_cfg)


def vision_dataset_config(dataset_cfg):
    """The typed config of a vision ``dataset`` section (a DictConfig, a dict, or already typed)."""
    if isinstance(dataset_cfg, tuple(VISION_SOURCES.values())):
        return dataset_cfg
    return _vision_dataset(dataset_cfg)
