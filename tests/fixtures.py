"""Test data written in the real on-disk formats."""
from nora.data.synthetic import write_cifar  # noqa: F401  (CIFAR python pickle batches)
