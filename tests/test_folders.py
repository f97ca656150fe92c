"""Tests for the on-disk datasets: ImageNet-style class folders and CIFAR python batches.

Every file is written here, in its real format, into a temporary folder; nothing is downloaded.
"""

from __future__ import annotations

import datetime
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crate_lit.data.cifar import CIFARDataModule
from crate_lit.data.imagenet import TRAIN_TRANSFORMS, ImageNetDataModule
from crate_lit.data.loading import IMAGENET_MEAN, IMAGENET_STD, DataError
from formats import (
    COLORS,
    LOADER,
    PIXEL_RGB,
    PIXEL_ROW,
    PIXEL_X,
    PIXEL_Y,
    WNIDS,
    add_truncated,
    cifar_rows,
    dump_pickle,
    noise,
)


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x * std + mean


def _eval_batches(dm) -> list:
    """Validation batches as the model gets them: uint8 from the loader, normalised on the device."""
    batches = []
    for x, y in dm.val_dataloader():
        assert x.dtype == torch.uint8  # workers hand uint8 to the device
        batches.append((dm.eval_batch(x), y))
    return batches


def _train_batches(dm) -> list:
    batches = []
    for x, y, keys in dm.train_dataloader():
        assert x.dtype == torch.uint8 and keys.dtype == torch.int64 and keys.shape == y.shape
        batches.append((dm.train_batch(x, keys), y))
    return batches


def _imagenet(root: Path, **kwargs) -> ImageNetDataModule:
    args = {"image_size": 32, "eval_resize": 36, "num_classes": 3, "batch_size": 4} | LOADER | kwargs
    dm = ImageNetDataModule(str(root), **args)
    dm.setup("fit")
    return dm


def test_imagenet_eval_batches_and_labels(imagenet_root: Path) -> None:
    dm = _imagenet(imagenet_root)
    assert dm.classes == WNIDS
    assert len(dm.val_set) == 6
    seen = 0
    for x, y in _eval_batches(dm):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
        assert y.dtype == torch.int64
        for image, label in zip(x, y, strict=True):
            # each class folder holds one solid colour: the label must name the folder it came from
            color = _unnormalize(image).mean(dim=(1, 2))
            expected = torch.tensor(COLORS[int(label)], dtype=torch.float32) / 255
            assert torch.allclose(color, expected, atol=0.03), (int(label), color)
            seen += 1
    assert seen == 6
    # labels follow the sorted wnid order, also in train
    for i in range(len(dm.train_set)):
        assert WNIDS[int(dm.train_set.labels[i])] == Path(dm.train_set.path(i)).parent.name


def test_imagenet_train_batches(imagenet_root: Path) -> None:
    dm = _imagenet(imagenet_root)
    # the extension filter is case-insensitive and ignores other files
    names = sorted(Path(dm.train_set.path(i)).name for i in range(len(dm.train_set)))
    assert names == ["a.JPEG", "b.png", "c.PNG", "cmyk.jpeg", "d.jpg", "gray.jpg"]
    batches = _train_batches(dm)
    assert len(batches) == 1  # 6 images, batch 4, last partial batch dropped
    x, y = batches[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2}
    assert torch.isfinite(x).all()


def test_mae_recipe_and_eval_resize_default(imagenet_root: Path) -> None:
    dm = _imagenet(imagenet_root, train_transform="mae")
    x, _ = dm.train_set[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert dm.train_reader.scale == TRAIN_TRANSFORMS["mae"][0] == (0.2, 1.0)
    assert dm.train_reader.resample == Image.BICUBIC
    assert ImageNetDataModule(str(imagenet_root), num_classes=3).eval_reader.resize == 256  # 224 / 0.875
    assert dm.eval_reader.resize == 36
    with pytest.raises(ValueError, match="train_transform"):
        ImageNetDataModule(str(imagenet_root), num_classes=3, train_transform="simclr")


def test_grayscale_and_cmyk_become_rgb(imagenet_root: Path) -> None:
    dm = _imagenet(imagenet_root)
    index = {Path(dm.train_set.path(i)).name: i for i in range(len(dm.train_set))}
    gray = dm.val_set.read(dm.train_set.path(index["gray.jpg"]))
    cmyk = dm.val_set.read(dm.train_set.path(index["cmyk.jpeg"]))
    assert gray.shape == cmyk.shape == (3, 32, 32) and gray.dtype == torch.uint8
    assert (gray.int() - 128).abs().max() <= 2
    # cyan 0, magenta 255, yellow 255, black 0 is red
    assert (cmyk.int() - torch.tensor([255, 0, 0]).view(3, 1, 1)).abs().max() <= 10


def test_truncated_image_error_names_the_file(imagenet_root: Path) -> None:
    bad = add_truncated(imagenet_root)
    dm = _imagenet(imagenet_root, batch_size=1)  # nothing dropped: the bad file is always reached
    with pytest.raises(DataError, match=bad.name) as info:
        for _ in dm.train_dataloader():
            pass
    assert "skip_corrupt" in str(info.value)


def test_skip_corrupt_passes_and_counts(imagenet_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = add_truncated(imagenet_root)
    dm = _imagenet(imagenet_root, skip_corrupt=True, batch_size=1)
    assert len(dm.train_set) == 7
    with caplog.at_level(logging.WARNING, logger="crate_lit.data.imagenet"):
        labels = [int(y) for _, y, _ in dm.train_dataloader()]
    assert len(labels) == 7  # the bad index is served by the next readable image
    assert dm.skip_count == 1
    assert dm.skipped == [str(bad)]
    assert any(bad.name in r.getMessage() and "1 skipped" in r.getMessage() for r in caplog.records)


def test_flat_val_folder(imagenet_root: Path) -> None:
    for i in range(4):
        noise((30, 30), i).save(imagenet_root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    with pytest.raises(ValueError, match="holds 4 images directly") as info:
        ImageNetDataModule(str(imagenet_root), num_classes=3)
    assert "class folders" in str(info.value) and "Preparing ImageNet" in str(info.value)


def test_missing_root_and_split(tmp_path: Path, imagenet_root: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ImageNetDataModule(str(missing), num_classes=3)
    for d in (imagenet_root / "val").iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    (imagenet_root / "val").rmdir()
    with pytest.raises(FileNotFoundError, match="val"):
        ImageNetDataModule(str(imagenet_root), num_classes=3)


def test_num_classes_mismatch(imagenet_root: Path) -> None:
    with pytest.raises(ValueError, match=r"found 3 class folders.*data\.num_classes=3"):
        ImageNetDataModule(str(imagenet_root), num_classes=1000)


def test_val_classes_not_in_train(imagenet_root: Path) -> None:
    (imagenet_root / "val" / "n99999999").mkdir()
    with pytest.raises(ValueError, match="n99999999"):
        ImageNetDataModule(str(imagenet_root), num_classes=3)


# ---------------------------------------------------------------------------------------------
# CIFAR


def _cifar(root: Path, **kwargs) -> CIFARDataModule:
    dm = CIFARDataModule(str(root), **({"image_size": 32, "batch_size": 4} | LOADER | kwargs))
    dm.setup("fit")
    return dm


def test_cifar10_channel_major_decoding(cifar10_root: Path) -> None:
    dm = _cifar(cifar10_root)
    assert dm.classes == [f"class{i}" for i in range(10)]
    assert tuple(dm.train_set.images[PIXEL_ROW, :, PIXEL_Y, PIXEL_X].tolist()) == PIXEL_RGB
    expected = torch.tensor(PIXEL_RGB, dtype=torch.float32) / 255
    for dataset in (dm.val_set, dm.train_images_for_eval()):  # train: data_batch_1 comes first
        x = dm.eval_batch(dataset[PIXEL_ROW][0][None])[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert torch.allclose(_unnormalize(x)[:, PIXEL_Y, PIXEL_X], expected, atol=1e-5)
    rows = cifar_rows(5, 2).reshape(5, 3, 32, 32)
    assert torch.equal(dm.val_set.images, torch.from_numpy(rows))


def test_cifar10_labels_and_loaders(cifar10_root: Path) -> None:
    dm = _cifar(cifar10_root, image_size=64)
    assert dm.train_set.labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 9, 8, 7]
    x, y = _eval_batches(dm)[0]
    assert y.tolist() == [3, 1, 4, 1] and y.dtype == torch.int64
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    batches = _train_batches(dm)  # RandAugment; random resized crop + flip + upsampling
    assert len(batches) == 2
    assert all(b[0].shape == (4, 3, 64, 64) and torch.isfinite(b[0]).all() for b in batches)


def test_cifar100_uses_fine_labels(cifar100_root: Path) -> None:
    dm = _cifar(cifar100_root, variant="cifar100")
    assert dm.hparams.num_classes == 100
    assert dm.train_set.labels.tolist() == [99, 50, 0, 1, 2, 3]
    assert dm.val_set.labels.tolist() == [10, 20, 30, 40]
    assert len(dm.classes) == 100
    assert tuple(dm.train_set.images[PIXEL_ROW, :, PIXEL_Y, PIXEL_X].tolist()) == PIXEL_RGB


def test_cifar_subset_and_folder_as_root(cifar10_root: Path) -> None:
    folder = cifar10_root / "cifar-10-batches-py"
    (folder / "data_batch_2").unlink()
    (folder / "batches.meta").unlink()
    dm = _cifar(folder)  # root may also be the extracted folder itself
    assert len(dm.train_set) == 7 and len(dm.val_set) == 5
    assert dm.classes is None


@pytest.mark.parametrize(
    "content, match",
    [
        (b"this is not a pickle at all", "not a CIFAR python batch"),
        ({"data": cifar_rows(2, 0)}, "labels"),
        ({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}, "3072"),
        ({"data": cifar_rows(2, 0), "labels": [0, 10]}, "outside"),
        ({"data": cifar_rows(1, 0), "labels": [datetime.date(2020, 1, 1)]}, "unexpected object"),
    ],
)
def test_cifar_malformed_file_is_named(cifar10_root: Path, content: object, match: str) -> None:
    path = cifar10_root / "cifar-10-batches-py" / "test_batch"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        dump_pickle(path, content)
    dm = CIFARDataModule(str(cifar10_root), image_size=32, **LOADER)
    with pytest.raises(ValueError, match=match) as info:
        dm.setup("fit")
    assert str(path) in str(info.value)


def test_cifar_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download") as info:
        CIFARDataModule(str(tmp_path / "data"), variant="cifar100", num_classes=100)
    assert "cifar-100-python" in str(info.value)


def test_cifar_argument_checks(cifar10_root: Path) -> None:
    with pytest.raises(ValueError, match=r"num_classes=10\b"):
        CIFARDataModule(str(cifar10_root), num_classes=100)
    with pytest.raises(ValueError, match="variant"):
        CIFARDataModule(str(cifar10_root), variant="svhn")


def test_cifar_batches_repickled_in_python3_with_bytes_keys(cifar10_root: Path) -> None:
    """What `pickle.load(f, encoding="bytes")` gives for the released (Python 2) files, dumped
    again with Python 3's default protocol: b'data', b'labels', bytes class names."""
    folder = cifar10_root / "cifar-10-batches-py"
    expected = _cifar(cifar10_root)
    for name in ("data_batch_1", "data_batch_2", "test_batch", "batches.meta"):
        with open(folder / name, "rb") as f:
            content = pickle.load(f, encoding="latin1")
        as_bytes = {
            key.encode(): [v.encode() for v in value] if key == "label_names" else value
            for key, value in content.items()
        }
        (folder / name).write_bytes(pickle.dumps(as_bytes))
    dm = _cifar(cifar10_root)
    assert dm.classes == [f"class{i}" for i in range(10)]
    assert torch.equal(dm.train_set.images, expected.train_set.images)
    assert dm.train_set.labels.tolist() == expected.train_set.labels.tolist()
    assert torch.equal(dm.val_set.images, expected.val_set.images)


def test_cifar_batch_without_labels_and_no_meta_names_the_keys(cifar10_root: Path) -> None:
    folder = cifar10_root / "cifar-10-batches-py"
    (folder / "batches.meta").unlink()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": cifar_rows(2, 0), b"filenames": [b"a.png"]}))
    dm = CIFARDataModule(str(cifar10_root), image_size=32, **LOADER)
    with pytest.raises(ValueError, match="lacks the key.s. labels") as info:
        dm.setup("fit")
    assert str(folder / "test_batch") in str(info.value) and "filenames" in str(info.value)
