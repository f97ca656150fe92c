"""ImageNet-style class folders (``root/<split>/<class>/*``) and the same images packed by
``crate-pack`` into tar shards (``shards``): datasets and data modules.

The DataModules take the *per-device* batch size, like every ``ImageDataModule``. Layout
problems are reported at construction as one ``FileNotFoundError``/``ValueError`` that names the
fix; file contents are read in ``setup`` and while iterating, where problems raise ``DataError``
naming the file.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from .augment import key_uniform, random_erasing
from .jpeg import (
    center_crop_box,
    decode_resized_crops,
    load_crop,
    random_resized_crop_box,
    read_jpeg_with_box,
)
from .loading import IMAGENET_MEAN, DataError, ImageDataModule, _check_positive_int
from .shards import ShardSamples, read_manifest

log = logging.getLogger(__name__)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# with skip_corrupt, give up after this many unreadable files in a row: a broken disk or mount
# should stop the run rather than silently train on nothing
MAX_CONSECUTIVE_SKIPS = 100
# skip counters: one for the main process and one per DataLoader worker (ids beyond share slots)
_COUNTER_SLOTS = 257

__all__ = [
    "CropReader",
    "IMG_EXTENSIONS",
    "ImageFolderDataset",
    "ImageNetDataModule",
    "ImageNetShardsDataModule",
    "ShardDataset",
    "TRAIN_TRANSFORMS",
]


# ---------------------------------------------------------------------------------------------
# reading images: decode, crop and resize in one step, uint8 out


class CropReader:
    """An image file as the model's uint8 (3, size, size) input: a RandomResizedCrop (``scale``
    given) or the evaluation crop (short side resized to ``resize``, centre ``size`` x ``size``)
    decoded and resampled in one step (``jpeg.load_crop``). With ``encoded`` a JPEG comes back
    undecoded with its crop box, for the device to decode (``data.decode=gpu``). ``augment``
    (uint8 image to uint8 image, e.g. RandAugment) runs on each decoded crop."""

    def __init__(
        self,
        size: int,
        scale: Optional[Tuple[float, float]] = None,
        resize: Optional[int] = None,
        resample: int = Image.BILINEAR,
        encoded: bool = False,
        augment: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        self.size, self.scale, self.resize, self.resample, self.encoded = (
            size,
            scale,
            resize,
            resample,
            encoded,
        )
        self.augment = augment

    def box(self, width: int, height: int) -> Tuple[float, float, float, float]:
        if self.scale is None:
            return center_crop_box(width, height, self.size, self.resize or _default_eval_resize(self.size))
        # drawn from torch's generator, which KeyedBatches seeded with this image's key
        return random_resized_crop_box(width, height, scale=self.scale)

    def __call__(self, path: str) -> Any:
        if self.encoded:
            try:
                data, box = read_jpeg_with_box(path, self.box)
                return data, torch.tensor(box, dtype=torch.float64)
            except ValueError:  # not a JPEG (ImageNet has a few PNGs named .JPEG): decoded here
                pass
        crop = load_crop(path, self.box, self.size, self.resample)
        # like the box, drawn from torch's generator, which KeyedBatches seeded with the image's key
        return crop if self.augment is None else self.augment(crop)


# train_transform recipes: RandomResizedCrop scale range and resampling
TRAIN_TRANSFORMS: Dict[str, Tuple[Tuple[float, float], int]] = {
    # ImageNet classification: RandomResizedCrop(image_size) + flip
    "imagenet": ((0.08, 1.0), Image.BILINEAR),
    # MAE pre-training: RandomResizedCrop(image_size, scale=(0.2, 1.0), bicubic) + flip
    "mae": ((0.2, 1.0), Image.BICUBIC),
}


def _collate_encoded(items: List[Tuple[Any, Any]]) -> Tuple[Any, ...]:
    """Batches of ``data.decode=gpu`` reads: JPEG bytes differ in length, so payloads stay a
    list (bytes with their boxes, or images decoded in the worker)."""
    payloads = [item[0] for item in items]
    return payloads, torch.tensor([int(item[1]) for item in items])


def _default_eval_resize(image_size: int) -> int:
    return int(image_size / 0.875)


def _rand_augment(value: Any, decode: str) -> Optional[T.RandAugment]:
    """``data.randaugment`` (null or [num_ops, magnitude]) as the workers' RandAugment.

    torchvision's RandAugment with the magnitude on timm's scale, 0-10 (``num_magnitude_bins``
    11; torchvision's default counts 30 steps): [2, 9] reaches timm's m9 strength on shear,
    translation, rotation, the colour enhancements and solarize. It is still not timm's
    ``rand-m9-mstd0.5-inc1`` of the released recipes: timm applies each chosen op with
    probability 0.5 and jitters the magnitude (std 0.5), where torchvision applies it always at
    the magnitude given; the ops differ (Identity here; Invert and SolarizeAdd there), and
    timm's increasing posterize keeps 1 bit at m9 where this keeps 4. Geometric ops fill with
    the ImageNet mean, as timm's do, not torchvision's black.
    """
    if value is None:
        return None
    whole = isinstance(value, (list, tuple)) and len(value) == 2
    whole = whole and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not whole or value[0] < 1 or not 0 <= value[1] <= 10:
        raise ValueError(
            f"data.randaugment is null (off) or [num_ops, magnitude] with num_ops >= 1 and magnitude "
            f"0-10 (timm's scale: [2, 9] for rand-m9), got {value!r}"
        )
    if decode == "gpu":
        raise ValueError(
            "data.randaugment runs in the workers on decoded crops, but data.decode=gpu leaves the "
            "decoding to the GPU; use data.decode=cpu with it, or data.randaugment=null"
        )
    fill = [round(255 * m) for m in IMAGENET_MEAN]
    return T.RandAugment(num_ops=value[0], magnitude=value[1], num_magnitude_bins=11, fill=fill)


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
    an error. ``read(path)`` turns a file into the item's image (``CropReader``: uint8 crops).
    Unreadable images raise an error naming the file, or with ``skip_corrupt`` are replaced by the
    next readable one and counted.
    """

    def __init__(
        self,
        split_dir: str,
        class_to_idx: Dict[str, int],
        read: Callable[[str], Any],
        skip_corrupt: bool = False,
    ) -> None:
        self.split_dir = str(split_dir)
        self._init_reading(read, skip_corrupt)
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

    def _init_reading(self, read: Callable[[Any], Any], skip_corrupt: bool) -> None:
        self.read = read
        self.collate = _collate_encoded if getattr(read, "encoded", False) else None
        self.skip_corrupt = skip_corrupt
        # paths skipped by *this* process; the shared counters also see the DataLoader workers, each
        # worker its own slot so that no lock is needed
        self.skipped: List[str] = []
        self._skip_counts = _shared_counters(_COUNTER_SLOTS)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        """Where image ``index`` is, as error messages name it."""
        return os.path.join(self.split_dir, self._paths[index])

    def source(self, index: int) -> Any:
        """What ``read`` takes for image ``index``: its path (a shard's bytes in ``ShardDataset``)."""
        return self.path(index)

    @property
    def skip_count(self) -> int:
        """Unreadable files skipped so far by this process and its DataLoader workers (a file is
        counted again each time it is hit, e.g. once per epoch; each DDP rank counts its own)."""
        return int(self._skip_counts.sum())

    def load(self, index: int) -> Any:
        path = self.path(index)
        try:
            return self.read(self.source(index))  # grayscale, CMYK, palette images come out RGB
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
            return image, int(self.labels[current])
        raise DataError(
            f"{MAX_CONSECUTIVE_SKIPS} unreadable images in a row from {self.path(index)} on; "
            "check the dataset files and the disk they are on"
        )


class ShardDataset(ImageFolderDataset):
    """One split of a ``crate-pack`` folder (``shards.ShardSamples``), read like the class
    folders it was packed from: same order, labels, readers and error handling."""

    def __init__(
        self,
        root: str,
        split: str,
        manifest: Dict[str, Any],
        read: Callable[[Any], Any],
        skip_corrupt: bool = False,
    ) -> None:
        self.split_dir = f"{root}/{split}"
        self._init_reading(read, skip_corrupt)
        self.samples = ShardSamples(root, split, manifest)
        self.labels = self.samples.labels
        self.classes = list(manifest["classes"])

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, index: int) -> str:
        return self.samples.name(index)

    def source(self, index: int) -> Any:
        return io.BytesIO(self.samples.read(index))


class ImageNetDataModule(ImageDataModule):
    """ImageNet (or any dataset) in class folders: ``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/*``.

    ``train_transform`` picks a recipe from ``TRAIN_TRANSFORMS`` (a RandomResizedCrop, then a
    horizontal flip on the device); evaluation resizes to ``eval_resize`` (default
    ``image_size / 0.875``) and center-crops ``image_size``. Workers decode, crop and resize in
    one step to uint8 (``CropReader``); with ``decode="gpu"`` they only read the JPEG bytes and
    the GPU decodes each batch (nvjpeg) and crops it there. ``num_classes`` must match the class
    folders, or be None to take them as found (CRATE-MAE pre-training uses no labels).

    ``randaugment=[num_ops, magnitude]`` runs torchvision's RandAugment on each uint8 crop in
    the workers, seeded by the image's key (``_rand_augment`` says how it differs from timm's);
    ``random_erasing`` is the probability of torchvision's RandomErasing (value 0 after
    normalisation), batched on the device. The recipes' order is crop, flip, RandAugment,
    normalise, erase; here the flip comes after RandAugment (on the device), which changes
    nothing in distribution since RandAugment's ops are as likely mirrored as not.
    """

    takes_classes_as_found = True

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        num_classes: Optional[int] = 1000,
        batch_size: int = 512,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        skip_corrupt: bool = False,
        train_transform: str = "imagenet",
        eval_resize: Optional[int] = None,
        decode: str = "cpu",
        randaugment: Optional[Sequence[int]] = None,
        random_erasing: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if decode not in ("cpu", "gpu"):
            raise ValueError(
                f"unknown data.decode {decode!r}; choose cpu (PIL in the workers) or gpu (nvjpeg)"
            )
        augment = _rand_augment(randaugment, decode)  # before the GPU check: a conflict on any machine
        number = isinstance(random_erasing, (int, float)) and not isinstance(random_erasing, bool)
        if not (number and 0.0 <= random_erasing <= 1.0):
            raise ValueError(f"data.random_erasing is a probability in [0, 1], got {random_erasing!r}")
        if decode == "gpu" and not torch.cuda.is_available():
            raise ValueError(
                "data.decode=gpu decodes JPEGs on a CUDA GPU, but torch sees none here; "
                "use data.decode=cpu (the default) on this machine"
            )
        _check_positive_int("data.image_size", image_size)
        if num_classes is not None:
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
        scale, resample = TRAIN_TRANSFORMS[train_transform]
        encoded = decode == "gpu"
        self.train_reader = CropReader(
            image_size, scale=scale, resample=resample, encoded=encoded, augment=augment
        )
        self.eval_reader = CropReader(image_size, resize=eval_resize, encoded=encoded)

    def _check_layout(self, root: str, num_classes: Optional[int]) -> List[str]:
        classes = self.class_folders(root)
        if num_classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"found {len(classes)} class folders in {os.path.join(root, 'train')} but "
                f"data.num_classes={num_classes}; set data.num_classes={len(classes)}"
            )
        return classes

    @staticmethod
    def class_folders(root: str) -> List[str]:
        """The class names of ``root/train`` after checking the layout (one line on a problem)."""
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
        return classes

    def _dataset(self, split: str, read: CropReader) -> ImageFolderDataset:
        hp = self.hparams
        return ImageFolderDataset(
            os.path.join(str(hp.root), split), self.class_to_idx, read=read, skip_corrupt=hp.skip_corrupt
        )

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._dataset("train", self.train_reader)
        if self.val_set is None:
            self.val_set = self._dataset("val", self.eval_reader)

    def train_images_for_eval(self) -> Dataset:
        return self._dataset("train", self.eval_reader)

    def train_batch(self, images: Tensor, keys: Tensor) -> Tensor:
        flip = key_uniform(keys, stream=4)[:, 0] < 0.5
        batch = self.normalize(torch.where(flip[:, None, None, None], images.flip(-1), images))
        if self.hparams.random_erasing > 0:
            batch = random_erasing(batch, keys, float(self.hparams.random_erasing))
        return batch

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.hparams.decode != "gpu":
            return batch
        payloads, *rest = batch
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cuda")
        return (self.decode_batch(payloads, device), *rest)

    def decode_batch(self, payloads: Sequence[Any], device: torch.device) -> Tensor:
        """``data.decode=gpu`` batches: (JPEG bytes, box) pairs decoded and cropped on ``device``
        in one call; images the workers decoded (files that are no JPEG) are copied in."""
        size = self.hparams.image_size
        out = torch.empty((len(payloads), 3, size, size), dtype=torch.uint8, device=device)
        encoded = [i for i, p in enumerate(payloads) if isinstance(p, tuple)]
        if encoded:
            crops = decode_resized_crops(
                [payloads[i][0] for i in encoded],
                [tuple(payloads[i][1].tolist()) for i in encoded],
                size,
                device,
            )
            out[encoded] = crops
        for i, payload in enumerate(payloads):
            if not isinstance(payload, tuple):
                out[i] = payload.to(device)
        return out

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


class ImageNetShardsDataModule(ImageNetDataModule):
    """``ImageNetDataModule`` over a folder that ``crate-pack`` wrote (WebDataset tar shards and
    their index, see ``crate_lit.data.shards``) instead of class folders: the same images in
    the same order, so the same recipe, sampler, DDP split and resume behaviour."""

    def _check_layout(self, root: str, num_classes: Optional[int]) -> List[str]:
        self.manifest = read_manifest(root)
        classes = list(self.manifest["classes"])
        missing = [split for split in ("train", "val") if split not in self.manifest["splits"]]
        if missing:
            raise ValueError(f"{root} has no {' or '.join(missing)} split; pack the dataset again")
        if num_classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"the shards in {root} hold {len(classes)} classes but data.num_classes={num_classes}; "
                f"set data.num_classes={len(classes)}"
            )
        return classes

    def _dataset(self, split: str, read: CropReader) -> ImageFolderDataset:
        return ShardDataset(str(self.hparams.root), split, self.manifest, read, self.hparams.skip_corrupt)
