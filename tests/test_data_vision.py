"""Vision data: the batched (device-resident) path against the per-sample torchvision path,
reproducible augmentation, digits splits, CIFAR pickle loading."""

import pytest
import torch
from fixtures import write_cifar
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from nora.data.batched import BatchedAugment, DeviceBatches, as_uint8_tensors
from nora.data.sampling import ShuffledBatchSampler
from nora.data.vision import EpochSeeded, build_transforms, load_cifar, load_digits

PCFG = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "interpolation": "bicubic"}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = write_cifar(tmp_path_factory.mktemp("c10"), "cifar10", n_train=120, n_test=40)
    return load_cifar("cifar10", root, download=False, verify_md5=False)


def test_cifar_pickles_load_through_torchvision(cifar):
    train, test = cifar
    assert len(train) == 120 and len(test) == 40
    images, labels = as_uint8_tensors(train)
    assert images.shape == (120, 3, 32, 32) and images.dtype == torch.uint8
    img, label = train[7]  # torchvision's own __getitem__ (PIL image)
    assert torch.equal(TF.pil_to_tensor(img), images[7]) and label == labels[7]


@pytest.mark.parametrize("size", [32, 48, 24])
def test_eval_transform_is_identical_on_both_paths(cifar, size):
    train, _ = cifar
    images, _ = as_uint8_tensors(train)
    per_sample = build_transforms(PCFG, size, train=False)
    batched = BatchedAugment(size, PCFG["mean"], PCFG["std"], "bicubic", train=False)
    want = torch.stack([per_sample(train[i][0]) for i in range(16)])
    got = batched(images[:16])
    assert got.shape == want.shape == (16, 3, size, size)
    # same ops, same rounding to uint8 after the resize: equal up to float rounding of the normalisation
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_random_crop_and_flip_match_torchvision_for_the_same_parameters(cifar):
    train, _ = cifar
    images, _ = as_uint8_tensors(train)
    aug = BatchedAugment(40, PCFG["mean"], PCFG["std"], "bicubic", train=True, hflip=True, crop_padding=4)
    params = aug.params(12, torch.Generator().manual_seed(3))
    got = aug.apply(images[:12], params)
    norm = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(PCFG["mean"], PCFG["std"])])
    for i in range(12):
        x = TF.resize(images[i], [40, 40], interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        x = TF.pad(x, [4, 4, 4, 4], padding_mode="reflect")
        x = TF.crop(x, int(params["top"][i]), int(params["left"][i]), 40, 40)
        if params["flip"][i]:
            x = TF.horizontal_flip(x)
        torch.testing.assert_close(got[i], norm(x), rtol=0, atol=1e-5)


def test_train_augmentation_distributions_match(cifar):
    train, _ = cifar
    images, labels = as_uint8_tensors(train)
    per_sample = EpochSeeded(train, build_transforms(PCFG, 32, True, True, 4), seed=0)
    a = torch.stack([per_sample[i][0] for i in range(len(train))])
    augment = BatchedAugment(32, PCFG["mean"], PCFG["std"], "bicubic", True, True, 4)
    b = augment(images, torch.Generator().manual_seed(0))
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    lo = (0 - torch.tensor(PCFG["mean"])) / torch.tensor(PCFG["std"])
    hi = (1 - torch.tensor(PCFG["mean"])) / torch.tensor(PCFG["std"])
    for x in (a, b):
        assert (x.amin(dim=(0, 2, 3)) >= lo - 1e-5).all() and (x.amax(dim=(0, 2, 3)) <= hi + 1e-5).all()
    # per-channel statistics agree (same images, same augmentation distribution, different draws)
    torch.testing.assert_close(a.mean(dim=(0, 2, 3)), b.mean(dim=(0, 2, 3)), atol=0.02, rtol=0)
    torch.testing.assert_close(a.std(dim=(0, 2, 3)), b.std(dim=(0, 2, 3)), atol=0.02, rtol=0)
    # flips happen about half the time on both paths
    flips = BatchedAugment(32, PCFG["mean"], PCFG["std"], train=True).params(4000, torch.Generator().manual_seed(1))
    assert 0.45 < flips["flip"].float().mean() < 0.55


def test_per_sample_augmentation_is_a_function_of_seed_epoch_index(cifar):
    train, _ = cifar
    ds = EpochSeeded(train, build_transforms(PCFG, 32, True, True, 4), seed=5)
    first = [ds[i][0] for i in (3, 9)]
    torch.manual_seed(123)  # the global RNG does not matter ...
    assert all(torch.equal(x, ds[i][0]) for x, i in zip(first, (3, 9)))
    before = [ds[i][0] for i in range(40)]
    ds.set_epoch(1)  # ... the epoch does
    changed = sum(not torch.equal(x, ds[i][0]) for i, x in enumerate(before))
    assert changed >= 30  # a repeat of the same crop offsets and flip has probability 1/162


def test_device_batches_resume_mid_epoch(cifar):
    train, _ = cifar
    images, labels = as_uint8_tensors(train)
    aug = BatchedAugment(32, PCFG["mean"], PCFG["std"], train=True, crop_padding=2)
    sampler = ShuffledBatchSampler(len(labels), 16, seed=1)
    sampler.set_epoch(2)
    full = list(DeviceBatches(images, labels, sampler, aug, seed=1, epoch=2))
    sampler.set_start(4)
    tail = list(DeviceBatches(images, labels, sampler, aug, seed=1, epoch=2))
    assert len(full) == 7 and len(tail) == 3
    for (x, y), (x2, y2) in zip(full[4:], tail):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_sampler_splits_ranks_disjointly():
    parts = []
    for rank in range(2):
        s = ShuffledBatchSampler(100, 8, seed=3, num_replicas=2, rank=rank)
        parts.append([i for b in s for i in b])
        assert len(s) == 6
    assert not set(parts[0]) & set(parts[1])


def test_digits_splits_and_domain_shift():
    from sklearn.datasets import load_digits as sk

    n = int((sk().target >= 5).sum())
    train, test = load_digits([5, 6, 7, 8, 9], 0.3)
    assert set(train.labels.tolist()) == set(range(5)) and len(train) + len(test) == n
    assert abs(len(test) - 0.3 * n) < 5
    rot_train, rot_test = load_digits([5, 6, 7, 8, 9], 0.3, "rot90")
    assert torch.equal(rot_test.images[:, 0], torch.rot90(test.images[:, 0], 1, dims=(1, 2)))
    tr, val = load_digits([5, 6, 7, 8, 9], 0.3, eval_split="validation", validation_fraction=0.25)
    assert len(tr) + len(val) == len(train)
    # the validation images come from the training images, never from the test images
    test_set = {bytes(x.numpy()) for x in test.images}
    assert not any(bytes(x.numpy()) in test_set for x in val.images) or len(test_set) < len(test)


def test_truncated_cifar_archive_is_reported_as_truncated(tmp_path):
    """A CIFAR tar.gz cut in half (an interrupted download) with no extracted folder: one line naming the
    archive and saying it is truncated, not that CIFAR is missing."""
    import shutil
    import tarfile

    from nora.errors import UserError

    root = write_cifar(tmp_path / "src", "cifar10", n_train=60, n_test=20)
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    shutil.rmtree(tmp_path / "src")
    whole = archive.read_bytes()
    archive.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError) as e:
        load_cifar("cifar10", archive.parent, download=False, verify_md5=False)
    msg = str(e.value)
    assert "\n" not in msg and f"{archive} is truncated" in msg and "not found" not in msg
    # the intact archive is not blamed: CIFAR is then reported as not extracted/missing, as before
    archive.write_bytes(whole)
    with pytest.raises(UserError, match="not found under"):
        load_cifar("cifar10", archive.parent, download=False, verify_md5=False)
