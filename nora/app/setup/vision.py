"""Image classification with timm ViTs: what ``run_training`` needs for ``family: vision``.

Order: the raw images (a missing dataset fails before any model download), the model with a new head, the
batch samplers (``trainer.batch_size`` per rank), then the data path (``trainer.data_path``): ``batched``
(uint8 images on the device, augmented a batch at a time) or ``per_sample`` (torchvision transforms in
DataLoader workers), and for NoRA's calibrated initialisation the first ``method.nora.calibration_batches``
training batches.
"""

from __future__ import annotations

import torch

from nora import models
from nora.app.config import RunConfig
from nora.app.setup.train_setup import TrainSetup
from nora.data.batched import BatchedAugment, DeviceBatches, as_uint8_tensors
from nora.data.sampling import ShuffledBatchSampler
from nora.data.vision import build_vision_data, load_vision_dataset
from nora.models.vision import input_size, pretrained_cfg
from nora.train import distributed as dist
from nora.train.loop import TrainData
from nora.train.tasks import ClassificationTask


def data_path(name: str, device: torch.device) -> str:
    """``auto`` takes ``batched`` on CUDA and ``per_sample`` elsewhere (``trainer.data_path`` is checked by
    :class:`nora.train.config.TrainerConfig`)."""
    if name == "auto":
        return "batched" if device.type == "cuda" else "per_sample"
    return name


def vision_setup(run: RunConfig, device: torch.device, world_size: int, rank: int) -> TrainSetup:
    raw = load_vision_dataset(run.dataset)  # missing data fails before any model download
    model = models.build_model(run.model, run.dataset.num_classes)
    bs, seed = run.trainer.batch_size, run.seed
    path = data_path(run.trainer.data_path, device)
    setup = TrainSetup(
        model=model,
        task=ClassificationTask(),
        data=TrainData(
            train_set=None,
            eval_set=None,
            train_sampler=ShuffledBatchSampler(len(raw[0]), bs, seed=seed, num_replicas=world_size, rank=rank),
            eval_sampler=ShuffledBatchSampler(
                len(raw[1]),
                run.trainer.eval_batch_size,
                shuffle=False,
                drop_last=False,
                num_replicas=world_size,
                rank=rank,
            ),
        ),
        head=run.model.head or "head",
        wrap=(lambda m: dist.wrap_ddp(m, device)) if world_size > 1 else None,
        extra={"data_path": path, "image_size": input_size(model)},
    )
    nora = run.method.nora
    n_calib = nora.calibration_batches if nora is not None and nora.init == "calibrated" else 0
    calib_sampler = ShuffledBatchSampler(len(raw[0]), bs, seed=seed + 1, drop_last=False)
    if path == "batched":
        _batched(setup, run, raw, device, calib_sampler, n_calib)
    else:
        _per_sample(setup, run, raw, device, calib_sampler, n_calib)
    return setup


def _batched(setup: TrainSetup, run: RunConfig, raw, device, calib_sampler, n_calib: int) -> None:
    pcfg, size, aug = pretrained_cfg(setup.model), input_size(setup.model), run.dataset.augment
    mean, std, interp = pcfg.get("mean", (0.5,) * 3), pcfg.get("std", (0.5,) * 3), pcfg.get("interpolation")
    train_aug = BatchedAugment(size, mean, std, interp, True, aug.hflip, aug.crop_padding)
    eval_aug = BatchedAugment(size, mean, std, interp, train=False)
    tensors = {
        "train": [t.to(device) for t in as_uint8_tensors(raw[0])],
        "eval": [t.to(device) for t in as_uint8_tensors(raw[1])],
    }

    def loader(dataset, sampler, epoch, train):
        return DeviceBatches(*tensors[dataset], sampler, train_aug if train else eval_aug, run.seed, epoch)

    setup.data.train_set, setup.data.eval_set, setup.data.loader_factory = "train", "eval", loader
    if n_calib:
        calibration = DeviceBatches(*tensors["train"], calib_sampler, eval_aug, run.seed, 0)
        setup.calibration = [x for _, (x, _y) in zip(range(n_calib), calibration)]


def _per_sample(setup: TrainSetup, run: RunConfig, raw, device, calib_sampler, n_calib: int) -> None:
    data = build_vision_data(run.dataset, pretrained_cfg(setup.model), input_size(setup.model), run.seed, raw=raw)
    setup.data.train_set, setup.data.eval_set = data.train, data.eval
    if n_calib:
        loader = torch.utils.data.DataLoader(data.calibration, batch_sampler=calib_sampler)
        setup.calibration = [x.to(device) for _, (x, _y) in zip(range(n_calib), loader)]
