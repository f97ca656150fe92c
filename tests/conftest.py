"""Fixtures shared by the test modules: dataset folders in the real on-disk formats, and one
finished run for the tests that need *a* crate-lit checkpoint (to resume, damage or refuse)."""

from __future__ import annotations

from pathlib import Path

import pytest

from commands import QUICK, crate_train
from formats import write_cifar10, write_cifar100, write_imagenet


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # the end-to-end runs (marked slow) first: pytest-xdist deals the first tests out over its
    # workers, so the long ones run side by side and the short ones fill in at the end, instead
    # of one worker finishing a long run alone while the other waits
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a finished one-epoch crate_micro run (``commands.QUICK``): one per test
    process. Tests that change it work on a copy."""
    cwd = tmp_path_factory.mktemp("trained")
    args = [a for a in QUICK if not a.startswith("trainer.max_epochs")]
    proc = crate_train(*args, "trainer.max_epochs=1", f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "run"
