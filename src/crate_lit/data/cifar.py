"""CIFAR-10 and CIFAR-100 in their python format (pickled batches): a restricted unpickler,
the batch loader and the data module.

``CIFARDataModule`` takes the *per-device* batch size, like every ``ImageDataModule``. A missing
folder is reported at construction as a ``FileNotFoundError`` that names the fix; the batches
are read in ``setup``, where a malformed one raises ``DataError`` naming the file.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from .augment import key_uniform, random_erasing, random_resized_crop_boxes, resized_crops
from .loading import DataError, ImageDataModule, InMemoryImages, _check_positive_int

log = logging.getLogger(__name__)

__all__ = ["CIFARDataModule", "load_cifar_batch"]


_CIFAR = {
    # variant: (folder, train files, test file, meta file, label key, names key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        10,
    ),
    "cifar100": ("cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names", 100),
}

# the globals a CIFAR batch written by any numpy/Python version refers to; anything else in the file
# means it is not a CIFAR batch (and unpickling it could run arbitrary code)
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]  # numpy 2 warns on numpy.core
        return super().find_class(module, name)


def _read_pickle(path: str) -> Dict[str, Any]:
    try:
        with open(path, "rb") as f:
            content = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise DataError(
            f"{path} is not a CIFAR python batch ({type(err).__name__}: {err}); replace it with the file "
            "from the extracted archive"
        ) from None
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a {type(content).__name__}, not the dict of a CIFAR python batch")
    # a batch loaded with pickle.load(f, encoding="bytes") and dumped again has bytes keys (b"data")
    # and bytes names (b"airplane"); the released files, read as latin-1, have str ones
    return {_text(key): value for key, value in content.items()}


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


def load_cifar_batch(path: str, label_key: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one CIFAR python batch.

    Rows are channel-major: 1024 red values, then green, then blue, each a row-major 32x32 plane.
    No checksums: any well-formed batch loads, subsets included.
    """
    batch = _read_pickle(path)
    missing = [k for k in ("data", label_key) if k not in batch]
    if missing:
        raise DataError(
            f"{path} lacks the key(s) {', '.join(missing)} of a CIFAR python batch "
            f"(has: {', '.join(map(str, batch)) or 'no keys'})"
        )
    data = np.asarray(batch["data"])
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' has shape {data.shape}; a CIFAR batch has rows of 3072 (3x32x32)")
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or (data.size and (data.min() < 0 or data.max() > 255)):
            raise DataError(f"{path}: 'data' must hold 8-bit pixel values, got dtype {data.dtype}")
        data = data.astype(np.uint8)
    labels = np.asarray(batch[label_key])
    if labels.shape != (len(data),) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(
            f"{path}: '{label_key}' must be {len(data)} integers (one per row), got shape {labels.shape}"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: '{label_key}' has values in [{labels.min()}, {labels.max()}], "
            f"outside 0..{num_classes - 1}"
        )
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels


class CIFARDataModule(ImageDataModule):
    """CIFAR-10 or CIFAR-100 from the python version (``cifar-10-batches-py``/``cifar-100-python``).

    ``root`` is the folder holding the extracted folder, or that folder itself. With ``download``,
    missing files are fetched by torchvision in ``prepare_data``; otherwise nothing touches the network.

    The fine-tuning recipe of the released ``finetune.py`` (RandomResizedCrop to ``image_size``
    straight from the 32 px image, flip, RandAugment(2, 14), ImageNet mean/std,
    RandomErasing(``random_erasing``); evaluation: Resize to ``image_size``), arranged so that
    workers touch only 32 px images: RandAugment runs per image in the workers at 32 px, before
    the crop instead of after it; the crop, its upsampling, the flip, normalisation and erasing
    run batched on the device (``train_batch``), and evaluation batches are upsampled there.
    Normalised with the ImageNet statistics, not CIFAR's, because the models are pre-trained on
    ImageNet and fine-tuning should feed them inputs on the scale they were trained with.
    """

    takes_classes_as_found = True  # num_classes=None: the variant's 10 or 100

    def __init__(
        self,
        root: str,
        variant: str = "cifar10",
        image_size: int = 224,
        num_classes: Optional[int] = None,
        download: bool = False,
        batch_size: int = 256,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        randaugment: bool = True,
        random_erasing: float = 0.0,
    ) -> None:
        super().__init__()
        if variant not in _CIFAR:
            raise ValueError(f"unknown data.variant {variant!r}; choose one of {', '.join(_CIFAR)}")
        expected_classes = _CIFAR[variant][-1]
        num_classes = expected_classes if num_classes is None else num_classes
        self.save_hyperparameters(logger=False)
        _check_positive_int("data.image_size", image_size)
        _check_positive_int("data.batch_size", batch_size)
        if num_classes != expected_classes:
            raise ValueError(
                f"data.num_classes={num_classes} does not match data.variant={variant} "
                f"({expected_classes} classes); set data.num_classes={expected_classes}"
            )
        if isinstance(random_erasing, bool) or not 0.0 <= float(random_erasing) <= 1.0:
            raise ValueError(f"data.random_erasing is a probability in [0, 1], got {random_erasing!r}")
        # per image, on uint8 32 px images in the workers (torchvision has no batched RandAugment)
        self.randaugment = T.RandAugment(num_ops=2, magnitude=14) if randaugment else None
        self.classes: Optional[List[str]] = None
        if not download:
            self._files()  # fail now, not at setup, when the files are not there

    def _find_folder(self) -> Optional[Path]:
        root = Path(str(self.hparams.root))
        folder, train_files, test_file = _CIFAR[self.hparams.variant][:3]
        for candidate in (root / folder, root):
            if (candidate / test_file).is_file() and any((candidate / f).is_file() for f in train_files):
                return candidate
        return None

    def _files(self) -> Tuple[List[Path], Path, Path]:
        """The train batches present, the test batch and the meta file (which may be absent)."""
        found = self._find_folder()
        if found is None:
            folder, train_files, test_file = _CIFAR[self.hparams.variant][:3]
            raise FileNotFoundError(
                f"{self.hparams.variant} not found under data.root={self.hparams.root}: expected "
                f"{folder}/ with {test_file} and {train_files[0]}; "
                f"set data.download=true on a machine with internet, or place the extracted {folder}/ there"
            )
        _, train_files, test_file, meta_file = _CIFAR[self.hparams.variant][:4]
        train = [found / f for f in train_files if (found / f).is_file()]
        return train, found / test_file, found / meta_file

    def prepare_data(self) -> None:
        if not self.hparams.download or self._find_folder() is not None:
            return
        # imported here: only a download needs it
        from torchvision.datasets import CIFAR10, CIFAR100
        from torchvision.datasets.utils import download_and_extract_archive

        source = CIFAR10 if self.hparams.variant == "cifar10" else CIFAR100
        download_and_extract_archive(
            source.url, download_root=str(self.hparams.root), filename=source.filename, md5=source.tgz_md5
        )

    def _load(self, paths: Sequence[Path]) -> Tuple[np.ndarray, np.ndarray]:
        label_key, classes = _CIFAR[self.hparams.variant][4], _CIFAR[self.hparams.variant][6]
        parts = [load_cifar_batch(str(p), label_key, classes) for p in paths]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _read_class_names(self, meta: Path) -> Optional[List[str]]:
        if not meta.is_file():
            return None
        names = _read_pickle(str(meta)).get(_CIFAR[self.hparams.variant][5])
        if names is None or len(names) != self.hparams.num_classes:
            raise DataError(
                f"{meta}: expected {self.hparams.num_classes} names under "
                f"'{_CIFAR[self.hparams.variant][5]}'; is it the meta file of {self.hparams.variant}?"
            )
        return [str(_text(n)) for n in names]

    def setup(self, stage: Optional[str] = None) -> None:
        train_files, test_file, meta = self._files()
        if self.classes is None:
            self.classes = self._read_class_names(meta)
        if self.train_set is None and stage in (None, "fit"):
            expected = len(_CIFAR[self.hparams.variant][1])
            if len(train_files) < expected:
                log.warning(
                    "found %d of the %d training batches; training on those", len(train_files), expected
                )
            images, labels = self._load(train_files)
            self.train_set = InMemoryImages(torch.from_numpy(images), labels, transform=self.randaugment)
        if self.val_set is None:
            images, labels = self._load([test_file])
            self.val_set = InMemoryImages(torch.from_numpy(images), labels)

    def train_batch(self, images: Tensor, keys: Tensor) -> Tensor:
        side = torch.full((len(images),), images.shape[-1], device=images.device)
        boxes = random_resized_crop_boxes(keys, side, side)
        flip = key_uniform(keys, stream=4)[:, 0] < 0.5
        batch = self.normalize(resized_crops(images, boxes, self.hparams.image_size, flip))
        if self.hparams.random_erasing > 0:
            batch = random_erasing(batch, keys, float(self.hparams.random_erasing))
        return batch

    def eval_batch(self, images: Tensor) -> Tensor:
        size = self.hparams.image_size
        if images.shape[-2:] != (size, size):
            # upsampling: bilinear with align_corners=False, as PIL's Resize((size, size)) does it
            images = F.interpolate(images.to(torch.float32), size=(size, size), mode="bilinear")
        return self.normalize(images)

    def train_images_for_eval(self) -> Dataset:
        if self.train_set is None:
            self.setup("fit")
        return InMemoryImages(self.train_set.images, self.train_set.labels)
