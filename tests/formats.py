"""Small dataset files in their real on-disk formats, written by the tests (nothing is
downloaded): ImageNet-style class folders and CIFAR's python batches."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted: labels 0, 1, 2
COLORS = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]  # one solid colour per class in val
LOADER = {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
PIXEL_ROW, PIXEL_Y, PIXEL_X, PIXEL_RGB = 2, 5, 11, (200, 10, 99)  # one known pixel in the CIFAR rows


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def add_truncated(root: Path) -> Path:
    path = root / "train" / WNIDS[2] / "truncated.jpg"
    noise((64, 48), 4).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def dump_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # like the original python-2 era files


def cifar_rows(n: int, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)
    for channel, value in enumerate(PIXEL_RGB if n > PIXEL_ROW else ()):
        data[PIXEL_ROW, channel * 1024 + PIXEL_Y * 32 + PIXEL_X] = value
    return data


def write_imagenet(tmp_path: Path) -> Path:
    """3 classes in train and val; odd sizes, JPEG/PNG, a grayscale and a CMYK JPEG, a stray text file."""
    root = tmp_path / "imagenet"
    train = [root / "train" / w for w in WNIDS]
    val = [root / "val" / w for w in WNIDS]
    for d in train + val:
        d.mkdir(parents=True)
    noise((37, 53), 0).save(train[0] / "a.JPEG")
    noise((300, 20), 1).save(train[0] / "b.png")
    Image.new("L", (40, 41), 128).save(train[1] / "gray.jpg")
    Image.new("CMYK", (45, 33), (0, 255, 255, 0)).save(train[1] / "cmyk.jpeg")
    noise((64, 64), 2).save(train[2] / "c.PNG")
    noise((20, 90), 3).save(train[2] / "d.jpg")
    (train[2] / "notes.txt").write_text("not an image")
    for i, (d, color) in enumerate(zip(val, COLORS, strict=True)):
        Image.new("RGB", (50 + i, 47), color).save(d / f"v{i}.JPEG", quality=95)
        Image.new("RGB", (33, 70), color).save(d / f"w{i}.png")
    return root


def write_cifar10(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    dump_pickle(
        folder / "data_batch_1",
        {"batch_label": "b1", "data": cifar_rows(7, 0), "labels": [0, 1, 2, 3, 4, 5, 6]},
    )
    dump_pickle(folder / "data_batch_2", {"batch_label": "b2", "data": cifar_rows(3, 1), "labels": [9, 8, 7]})
    dump_pickle(
        folder / "test_batch", {"batch_label": "t", "data": cifar_rows(5, 2), "labels": [3, 1, 4, 1, 5]}
    )
    dump_pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    return tmp_path


def write_cifar100(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    dump_pickle(
        folder / "train",
        {"data": cifar_rows(6, 3), "fine_labels": [99, 50, 0, 1, 2, 3], "coarse_labels": [0] * 6},
    )
    dump_pickle(
        folder / "test", {"data": cifar_rows(4, 4), "fine_labels": [10, 20, 30, 40], "coarse_labels": [1] * 4}
    )
    dump_pickle(
        folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": []}
    )
    return tmp_path
