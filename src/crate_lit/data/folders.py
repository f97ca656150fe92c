"""Image datasets read from disk: ImageNet-style class folders and CIFAR-10/100 python batches.

Both DataModules take the *per-device* batch size, like ``ShapesDataModule``. Layout problems are
reported at construction as one ``FileNotFoundError``/``ValueError`` that names the fix; file contents
are read in ``setup`` and while iterating, where problems raise ``DataError`` naming the file.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from .datamodules import DataError, make_loader

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# with skip_corrupt, give up after this many unreadable files in a row: a broken disk or mount
# should stop the run rather than silently train on nothing
MAX_CONSECUTIVE_SKIPS = 100
# skip counters: one for the main process and one per DataLoader worker (ids beyond share slots)
_COUNTER_SLOTS = 257

__all__ = [
    "CIFARDataModule",
    "CIFARDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "ImageFolderDataset",
    "ImageNetDataModule",
    "TRAIN_TRANSFORMS",
    "cifar_eval_transform",
    "cifar_train_transform",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "load_cifar_batch",
    "mae_train_transform",
]


# ---------------------------------------------------------------------------------------------
# transforms


def _to_normalized_tensor() -> List[Any]:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def imagenet_train_transform(image_size: int) -> T.Compose:
    """Standard ImageNet training augmentation: random resized crop and horizontal flip."""
    return T.Compose(
        [T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip(), *_to_normalized_tensor()]
    )


def mae_train_transform(image_size: int) -> T.Compose:
    """MAE pre-training augmentation: larger crop range, bicubic resampling, flip."""
    return T.Compose(
        [
            T.RandomResizedCrop(
                image_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC, antialias=True
            ),
            T.RandomHorizontalFlip(),
            *_to_normalized_tensor(),
        ]
    )


def imagenet_eval_transform(image_size: int, resize: Optional[int] = None) -> T.Compose:
    """Resize the short side to ``resize`` (default ``image_size / 0.875``), then center-crop."""
    resize = _default_eval_resize(image_size) if resize is None else resize
    return T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(image_size), *_to_normalized_tensor()])


TRAIN_TRANSFORMS: Dict[str, Callable[[int], T.Compose]] = {
    "imagenet": imagenet_train_transform,
    "mae": mae_train_transform,
}


def cifar_train_transform(image_size: int, randaugment: bool = True) -> T.Compose:
    """Fine-tuning recipe: upscale, random resized crop, flip, RandAugment(2, 14).

    Normalised with the ImageNet statistics, not CIFAR's, because the models are pre-trained on
    ImageNet and fine-tuning should feed them inputs on the scale they were trained with.
    """
    steps: List[Any] = [T.ToImage()]
    if image_size != 32:
        steps.append(T.Resize(image_size, antialias=True))
    steps += [T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()]
    if randaugment:
        steps.append(T.RandAugment(num_ops=2, magnitude=14))  # on uint8, before scaling to float
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def cifar_eval_transform(image_size: int) -> T.Compose:
    """Upscale (when ``image_size`` is not 32) and normalise with the ImageNet statistics."""
    steps: List[Any] = [T.ToImage()]
    if image_size != 32:
        steps.append(T.Resize(image_size, antialias=True))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def _default_eval_resize(image_size: int) -> int:
    return int(image_size / 0.875)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------------------------
# class folders


class _PathTable:
    """Many relative paths packed into two numpy arrays.

    A list of 1.28M Python strings gets its refcounts touched in every DataLoader worker, which
    copies the forked pages one by one until each worker holds its own copy; flat arrays do not.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, stop = self._offsets[index], self._offsets[index + 1]
        return self._blob[start:stop].tobytes().decode("utf-8", "surrogateescape")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def list_class_folders(directory: str) -> List[str]:
    """Sorted names of the non-hidden sub-folders of ``directory``."""
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _count_loose_images(directory: str) -> int:
    with os.scandir(directory) as entries:
        return sum(1 for e in entries if _is_image(e.name) and e.is_file())


def _scan_images(directory: str) -> List[str]:
    """Image files under ``directory`` (recursively), relative to it, sorted for a stable order."""
    found: List[str] = []
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(os.path.join(directory, rel)) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    pending.append(os.path.join(rel, entry.name))
                elif _is_image(entry.name) and entry.is_file():
                    found.append(os.path.join(rel, entry.name))
    found.sort()
    return found


def _shared_counters(slots: int) -> torch.Tensor:
    counts = torch.zeros(slots, dtype=torch.int64)
    try:
        # shared memory survives fork and spawn alike, unlike a multiprocessing.Value whose lock is
        # tied to the start method it was created with
        return counts.share_memory_()
    except RuntimeError:  # no shared memory (some sandboxes): each process counts for itself
        return counts


class ImageFolderDataset(Dataset):
    """Images in ``split_dir/<class>/...``, labelled by ``class_to_idx``; classes missing from it are
    an error. Unreadable images raise an error naming the file, or with ``skip_corrupt`` are replaced
    by the next readable one and counted.
    """

    def __init__(
        self,
        split_dir: str,
        class_to_idx: Dict[str, int],
        transform: Optional[Callable[[Image.Image], Any]] = None,
        skip_corrupt: bool = False,
    ) -> None:
        self.split_dir = str(split_dir)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        classes = list_class_folders(self.split_dir)
        unknown = sorted(set(classes) - set(class_to_idx))
        if unknown:
            raise DataError(f"{self.split_dir} has class folders without a label: {', '.join(unknown[:5])}")
        paths: List[str] = []
        labels: List[int] = []
        for name in classes:
            files = _scan_images(os.path.join(self.split_dir, name))
            paths += [os.path.join(name, f) for f in files]
            labels += [class_to_idx[name]] * len(files)
        if not paths:
            raise DataError(
                f"no images ({', '.join(IMG_EXTENSIONS)}) found in the class folders of {self.split_dir}"
            )
        self._paths = _PathTable(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        # paths skipped by *this* process; the shared counters also see the DataLoader workers, each
        # worker its own slot so that no lock is needed
        self.skipped: List[str] = []
        self._skip_counts = _shared_counters(_COUNTER_SLOTS)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        return os.path.join(self.split_dir, self._paths[index])

    @property
    def skip_count(self) -> int:
        """Unreadable files skipped so far by this process and its DataLoader workers (a file is
        counted again each time it is hit, e.g. once per epoch; each DDP rank counts its own)."""
        return int(self._skip_counts.sum())

    def load(self, index: int) -> Image.Image:
        path = self.path(index)
        try:
            with Image.open(path) as img:
                return img.convert("RGB")  # also decodes: grayscale, CMYK, palette become RGB
        # PIL signals broken files with many exception types (OSError, SyntaxError, struct.error, ...)
        except Exception as err:
            raise DataError(
                f"cannot read image {path}: {err}; fix or delete the file, or set data.skip_corrupt=true"
            ) from err

    def _record_skip(self, index: int, err: Exception) -> None:
        path = self.path(index)
        worker = torch.utils.data.get_worker_info()
        self._skip_counts[0 if worker is None else 1 + worker.id % (_COUNTER_SLOTS - 1)] += 1
        if path not in self.skipped:
            self.skipped.append(path)
            log.warning(
                "skipping unreadable image %s (%d skipped so far): %s", path, self.skip_count, err.__cause__
            )

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        for attempt in range(MAX_CONSECUTIVE_SKIPS):
            current = (index + attempt) % len(self)
            try:
                image = self.load(current)
            except DataError as err:
                if not self.skip_corrupt:
                    raise
                self._record_skip(current, err)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, int(self.labels[current])
        raise DataError(
            f"{MAX_CONSECUTIVE_SKIPS} unreadable images in a row from {self.path(index)} on; "
            "check the dataset files and the disk they are on"
        )


class ImageNetDataModule(L.LightningDataModule):
    """ImageNet (or any dataset) in class folders: ``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/*``.

    ``train_transform`` picks a recipe from ``TRAIN_TRANSFORMS``; evaluation resizes to ``eval_resize``
    (default ``image_size / 0.875``) and center-crops ``image_size``.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        num_classes: int = 1000,
        batch_size: int = 256,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        skip_corrupt: bool = False,
        train_transform: str = "imagenet",
        eval_resize: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_positive_int("data.image_size", image_size)
        _check_positive_int("data.num_classes", num_classes)
        _check_positive_int("data.batch_size", batch_size)
        if train_transform not in TRAIN_TRANSFORMS:
            raise ValueError(
                f"unknown data.train_transform {train_transform!r}; "
                f"choose one of {', '.join(TRAIN_TRANSFORMS)}"
            )
        eval_resize = _default_eval_resize(image_size) if eval_resize is None else eval_resize
        _check_positive_int("data.eval_resize", eval_resize)
        if eval_resize < image_size:
            raise ValueError(
                f"data.eval_resize={eval_resize} is smaller than data.image_size={image_size}; "
                "the center crop would be padded: use eval_resize >= image_size (or null for the default)"
            )
        self.classes = self._check_layout(str(root), num_classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.train_transform = TRAIN_TRANSFORMS[train_transform](image_size)
        self.eval_transform = imagenet_eval_transform(image_size, eval_resize)
        self.train_set: Optional[ImageFolderDataset] = None
        self.val_set: Optional[ImageFolderDataset] = None

    @staticmethod
    def _check_layout(root: str, num_classes: int) -> List[str]:
        expected = "expected root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG"
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data.root={root} does not exist or is not a folder; {expected}")
        split_classes = {}
        for split in ("train", "val"):
            directory = os.path.join(root, split)
            if not os.path.isdir(directory):
                raise FileNotFoundError(f"{directory} not found; {expected}")
            loose = _count_loose_images(directory)
            if loose:
                raise ValueError(
                    f"{directory} holds {loose} images directly instead of class folders <wnid>/; "
                    "the folder is flat: sort them into class folders first "
                    "(see README: 'Preparing ImageNet')"
                )
            split_classes[split] = list_class_folders(directory)
            if not split_classes[split]:
                raise ValueError(f"{directory} has no class folders; {expected}")
        classes = split_classes["train"]
        extra = sorted(set(split_classes["val"]) - set(classes))
        if extra:
            raise ValueError(
                f"{len(extra)} class folders in {os.path.join(root, 'val')} have no counterpart in "
                f"{os.path.join(root, 'train')}, e.g. {', '.join(extra[:5])}; both splits must use the same "
                "class folder names"
            )
        if len(classes) != num_classes:
            raise ValueError(
                f"found {len(classes)} class folders in {os.path.join(root, 'train')} but "
                f"data.num_classes={num_classes}; set data.num_classes={len(classes)}"
            )
        return classes

    def _dataset(self, split: str, transform: Any) -> ImageFolderDataset:
        hp = self.hparams
        return ImageFolderDataset(
            os.path.join(str(hp.root), split),
            self.class_to_idx,
            transform=transform,
            skip_corrupt=hp.skip_corrupt,
        )

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._dataset("train", self.train_transform)
        if self.val_set is None:
            self.val_set = self._dataset("val", self.eval_transform)

    @property
    def skipped(self) -> List[str]:
        """Unreadable files skipped in this (the main) process; workers report theirs in the log."""
        return [p for ds in (self.train_set, self.val_set) if ds is not None for p in ds.skipped]

    @property
    def skip_count(self) -> int:
        """Unreadable-file skips over all DataLoader workers (see ``ImageFolderDataset.skip_count``)."""
        return sum(ds.skip_count for ds in (self.train_set, self.val_set) if ds is not None)

    def teardown(self, stage: Optional[str] = None) -> None:
        if self.skip_count:
            log.warning("skipped %d unreadable images (data.skip_corrupt=true)", self.skip_count)

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.train_set, self.hparams, train=True, trainer=self.trainer)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, self.hparams, train=False)


# ---------------------------------------------------------------------------------------------
# CIFAR


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


class CIFARDataset(Dataset):
    """In-memory CIFAR images (N, 3, 32, 32) uint8 with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Optional[Callable] = None) -> None:
        self.images = torch.from_numpy(images)
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class CIFARDataModule(L.LightningDataModule):
    """CIFAR-10 or CIFAR-100 from the python version (``cifar-10-batches-py``/``cifar-100-python``).

    ``root`` is the folder holding the extracted folder, or that folder itself. With ``download``,
    missing files are fetched by torchvision in ``prepare_data``; otherwise nothing touches the network.
    """

    def __init__(
        self,
        root: str,
        variant: str = "cifar10",
        image_size: int = 224,
        num_classes: Optional[int] = None,
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        randaugment: bool = True,
    ) -> None:
        super().__init__()
        if variant not in _CIFAR:
            raise ValueError(f"unknown data.variant {variant!r}; choose one of {', '.join(_CIFAR)}")
        expected_classes = _CIFAR[variant][-1]
        num_classes = expected_classes if num_classes is None else num_classes
        self.save_hyperparameters()
        _check_positive_int("data.image_size", image_size)
        _check_positive_int("data.batch_size", batch_size)
        if num_classes != expected_classes:
            raise ValueError(
                f"data.num_classes={num_classes} does not match data.variant={variant} "
                f"({expected_classes} classes); set data.num_classes={expected_classes}"
            )
        self.train_transform = cifar_train_transform(image_size, randaugment)
        self.eval_transform = cifar_eval_transform(image_size)
        self.classes: Optional[List[str]] = None
        self.train_set: Optional[CIFARDataset] = None
        self.val_set: Optional[CIFARDataset] = None
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
            self.train_set = CIFARDataset(*self._load(train_files), transform=self.train_transform)
        if self.val_set is None:
            self.val_set = CIFARDataset(*self._load([test_file]), transform=self.eval_transform)

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.train_set, self.hparams, train=True, trainer=self.trainer)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, self.hparams, train=False)
