"""Test data written in the real on-disk formats, and the rule for tests of the fused CPU extension."""

import os

import pytest

from nora.data.synthetic import write_cifar  # noqa: F401  (CIFAR python pickle batches)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_cpu_extension() -> None:
    """The fused CPU kernel is the main CPU backend: when it cannot be built, its tests skip locally (no
    compiler, NORA_NO_BUILD=1) but fail in CI (``CI=true``), where a build failure must not pass unnoticed."""
    from nora.kernels import available_backends
    from nora.kernels.cpu import build_error

    if "cpu" in available_backends("cpu"):
        return
    why = f"the fused CPU extension could not be built here: {build_error() or 'unknown reason (see the warning)'}"
    if in_ci():
        pytest.fail(f"{why} (CI=true: a build failure fails the tests instead of skipping them)", pytrace=False)
    pytest.skip(why)
