"""Fixtures shared by the test modules: dataset folders in the real on-disk formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from formats import write_cifar10, write_cifar100, write_imagenet


@pytest.fixture
def imagenet_root(tmp_path: Path) -> Path:
    """3 classes in train and val; odd sizes, JPEG/PNG, a grayscale and a CMYK JPEG, a stray text file."""
    return write_imagenet(tmp_path)


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    return write_cifar10(tmp_path)


@pytest.fixture
def cifar100_root(tmp_path: Path) -> Path:
    return write_cifar100(tmp_path)
