"""The image data-module base shared by every dataset, and the built-in shapes data module.

Workers hand **uint8** batches (B, 3, H, W) to the device; ``on_after_batch_transfer`` turns
them into normalised float there and applies the batch-level random transforms (flips,
translations, erasing), on the GPU when there is one and on the CPU otherwise, with the same
code. Each DataModule takes the *per-device* batch size; ``crate_lit.train`` derives it from
the global ``data.batch_size``.

Randomness is a function of (seed, epoch, image index) alone: ``EpochSampler`` gives every
training image a 63-bit key, per-sample work in workers runs under torch's generator seeded with
it, and the device side draws its numbers from the keys with a counter-based hash
(``key_uniform``). A run with any worker count, resumed or not, on one process or split over
DDP ranks, therefore sees the same images with the same augmentations.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from ..runs import atomic_write
from . import shapes
from .shapes import DEFAULT_SCALE, ShapesDataset

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A dataset file that cannot be used (unreadable image, malformed batch); names the file."""


def global_seed() -> int:
    """The run's seed, as ``L.seed_everything`` left it for every process (0 when unset)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def stable_seed(*parts: int) -> int:
    """A 63-bit seed made of integers, e.g. (seed, epoch, index): the same in every process and
    on every machine, which Python's ``hash`` does not promise."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


# ---------------------------------------------------------------------------------------------
# per-image random numbers on the device

_MASK32 = 0xFFFF_FFFF


def _mul32(x: Tensor, constant: int) -> Tensor:
    """``x * constant mod 2**32`` for int64 tensors of 32-bit values, without int64 overflow
    (a full 32 x 32-bit product does not fit): the constant is split into 16-bit halves."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    # a 32-bit integer finaliser (xorshift-multiply rounds with well-mixing odd constants)
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def key_uniform(keys: Tensor, stream: int, count: int = 1) -> Tensor:
    """``count`` numbers in [0, 1) per image, float32 (B, count), from each image's int64 key.

    A pure function of (key, stream, position): the same on every device and for any batch
    composition. ``stream`` separates the draws of different transforms.
    """
    keys = keys.to(torch.int64)
    state = _mix32((keys & _MASK32) ^ _mix32((keys >> 32) ^ (stream * 0x9E37 + 0x632B)))
    counter = torch.arange(count, device=keys.device, dtype=torch.int64)
    bits = _mix32(state[:, None] ^ _mix32(counter + 0x3C6EF372 + stream))
    return (bits >> 8).to(torch.float32) / float(1 << 24)


# ---------------------------------------------------------------------------------------------
# batch transforms (uint8 or float images (B, C, H, W), parameters per image)


def flip_and_translate(images: Tensor, flip: Tensor, shift_y: Tensor, shift_x: Tensor) -> Tensor:
    """Horizontal flip where ``flip``, then a translation by (shift_y, shift_x) pixels with the
    border reflected: what RandomHorizontalFlip + RandomCrop(size, padding, "reflect") do to one
    image, for a whole batch in one gather."""
    b, c, h, w = images.shape

    def reflected(size: int, shift: Tensor) -> Tensor:
        index = torch.arange(size, device=images.device)[None, :] + shift[:, None].to(torch.int64)
        index = index.abs()  # reflect at 0 (the edge pixel itself is not repeated)
        return torch.where(index > size - 1, 2 * (size - 1) - index, index)

    rows = reflected(h, shift_y)
    cols = reflected(w, shift_x)
    cols = torch.where(flip[:, None], w - 1 - cols, cols)
    flat = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return images.reshape(b, c, h * w).gather(2, flat).view(b, c, h, w)


def random_erasing(
    images: Tensor,
    keys: Tensor,
    p: float,
    scale: Tuple[float, float] = (0.02, 0.33),
    ratio: Tuple[float, float] = (0.3, 3.3),
    attempts: int = 10,
) -> Tensor:
    """torchvision's RandomErasing (value 0 on normalised images) for a batch: with probability
    ``p`` an image gets one rectangle of ``scale`` of its area and aspect ``ratio`` zeroed; of
    ``attempts`` draws the first that fits is used, and none when none fits."""
    b, _, h, w = images.shape
    u = key_uniform(keys, stream=3, count=1 + 2 * attempts + 2 * attempts)
    erase = u[:, 0] < p
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, 1 : 1 + attempts])
    log_low, log_high = torch.log(torch.tensor(ratio, dtype=torch.float32, device=images.device))
    aspect = torch.exp(log_low + (log_high - log_low) * u[:, 1 + attempts : 1 + 2 * attempts])
    eh = torch.round(torch.sqrt(area * aspect)).to(torch.int64)
    ew = torch.round(torch.sqrt(area / aspect)).to(torch.int64)
    fits = (eh < h) & (ew < w)
    first = torch.where(fits.any(1), fits.to(torch.int8).argmax(1), 0)
    erase &= fits.any(1)
    pick = first[:, None]
    eh, ew = eh.gather(1, pick)[:, 0], ew.gather(1, pick)[:, 0]
    offsets = u[:, 1 + 2 * attempts :].view(b, attempts, 2).gather(1, pick[:, :, None].expand(b, 1, 2))[:, 0]
    top = (offsets[:, 0] * (h - eh + 1).to(torch.float32)).to(torch.int64).clamp(max=h - 1)
    left = (offsets[:, 1] * (w - ew + 1).to(torch.float32)).to(torch.int64).clamp(max=w - 1)
    ys = torch.arange(h, device=images.device)[None, :]
    xs = torch.arange(w, device=images.device)[None, :]
    inside_y = (ys >= top[:, None]) & (ys < (top + eh)[:, None])
    inside_x = (xs >= left[:, None]) & (xs < (left + ew)[:, None])
    mask = erase[:, None, None] & inside_y[:, :, None] & inside_x[:, None, :]
    return images.masked_fill(mask[:, None], 0)


def random_resized_crop_boxes(
    keys: Tensor,
    heights: Tensor,
    widths: Tensor,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Tensor:
    """torchvision's RandomResizedCrop box for each image, (B, 4) int64 (top, left, h, w): of
    ``attempts`` draws of area share and log-uniform aspect, the first that fits, else the
    centred crop of the whole image clamped to ``ratio``."""
    heights, widths = heights.to(torch.int64), widths.to(torch.int64)
    u = key_uniform(keys, stream=2, count=4 * attempts).view(-1, attempts, 4).to(torch.float64)
    area = (heights * widths).to(torch.float64)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_low, log_high = torch.log(torch.tensor(ratio, dtype=torch.float64, device=keys.device))
    aspect = torch.exp(log_low + (log_high - log_low) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect)).to(torch.int64)
    h = torch.round(torch.sqrt(target / aspect)).to(torch.int64)
    fits = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    top = (u[..., 2] * (heights[:, None] - h + 1)).to(torch.int64)
    left = (u[..., 3] * (widths[:, None] - w + 1)).to(torch.int64)
    first = fits.to(torch.int8).argmax(1, keepdim=True)
    boxes = torch.stack([t.gather(1, first)[:, 0] for t in (top, left, h, w)], 1)
    # the fallback: the whole image, cut to the nearest allowed aspect ratio
    in_ratio = widths.to(torch.float64) / heights.to(torch.float64)
    fw = torch.where(in_ratio > ratio[1], torch.round(heights * ratio[1]).to(torch.int64), widths)
    fh = torch.where(in_ratio < ratio[0], torch.round(widths / ratio[0]).to(torch.int64), heights)
    fallback = torch.stack([(heights - fh) // 2, (widths - fw) // 2, fh, fw], 1)
    return torch.where(fits.any(1, keepdim=True), boxes, fallback)


def resized_crops(images: Tensor, boxes: Tensor, size: int, flip: Optional[Tensor] = None) -> Tensor:
    """Each image's box (top, left, h, w) resized to ``size`` x ``size`` (bilinear), mirrored
    where ``flip``: one ``grid_sample`` for the batch, float32 out on the 0-255 scale. Samples
    at the box's edge blend with the pixels just outside it, where a crop-then-resize repeats the
    edge pixel."""
    b, _, h, w = images.shape
    top, left, bh, bw = (boxes[:, i].to(torch.float32) for i in range(4))
    sx, sy = bw / w, bh / h
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * left + bw) / w - 1
    theta[:, 1, 1], theta[:, 1, 2] = sy, (2 * top + bh) / h - 1
    grid = torch.nn.functional.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(
        images.to(torch.float32), grid, mode="bilinear", padding_mode="border", align_corners=False
    )


# ---------------------------------------------------------------------------------------------
# loading


class EpochSampler(DistributedSampler):
    """Training order and augmentation as functions of (seed, epoch) alone.

    The order is ``DistributedSampler``'s permutation (so one process sees, batch by batch, the
    union of what the DDP ranks see), and each index comes paired with the key of its random
    augmentation. A run resumed from a checkpoint, a DDP run and a run with any number of
    workers therefore draw the same images with the same augmentations.
    """

    # (epoch, n): the first n indices of that epoch were trained on before a mid-epoch resume
    resume_at: Optional[Tuple[int, int]] = None

    def __iter__(self) -> Iterator[Tuple[int, int]]:  # type: ignore[override]
        skip = 0
        if self.resume_at is not None:
            epoch, skip = self.resume_at
            self.resume_at = None
            skip = skip if epoch == self.epoch else 0
        for position, index in enumerate(super().__iter__()):
            if position >= skip:
                yield index, stable_seed(self.seed, self.epoch, index)


class InMemoryImages(Dataset):
    """uint8 images (N, 3, H, W) with int64 labels (and optionally bool masks (N, H, W)) in
    memory; ``transform`` (per image, uint8 to uint8) runs in the workers when set, otherwise a
    batch is one indexing operation (``batch``)."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        masks: Optional[Tensor] = None,
        transform: Optional[Any] = None,
    ) -> None:
        self.images, self.labels, self.masks = images, torch.as_tensor(labels, dtype=torch.int64), masks
        self.transform = transform
        self.return_mask = False

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[Any, ...]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        item = (image, int(self.labels[index]))
        return (*item, self.masks[index]) if self.return_mask and self.masks is not None else item

    def batch(self, indices: Sequence[int]) -> Tuple[Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        batch = (self.images[index], self.labels[index])
        return (*batch, self.masks[index]) if self.return_mask and self.masks is not None else batch


class KeyedBatches(Dataset):
    """A dataset fetched a batch at a time (``__getitems__``, which DataLoader prefers to
    ``__getitem__``): ``(images uint8, labels, keys)`` for training, where ``EpochSampler``
    hands out ``(index, key)`` pairs, and ``(images, labels)`` for evaluation.

    In-memory datasets without a per-image transform return the whole batch with one indexing
    operation; others are read image by image, each under torch's generator seeded with its
    key so that its per-image random transform is reproducible.
    """

    def __init__(self, dataset: Dataset, keyed: bool) -> None:
        self.dataset = dataset
        self.keyed = keyed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitems__(self, items: Sequence[Any]) -> Tuple[Tensor, ...]:
        if self.keyed:
            # Lightning's overfit_batches swaps EpochSampler for a sequential sampler of plain
            # indices: those images keep one key of their own (-1 marks it off the epoch keys)
            items = [i if isinstance(i, tuple) else (i, stable_seed(-1, int(i))) for i in items]
            indices = [int(index) for index, _ in items]
            keys = torch.tensor([key for _, key in items], dtype=torch.int64)
        else:
            indices, keys = [int(index) for index in items], None
        if isinstance(self.dataset, InMemoryImages) and self.dataset.transform is None:
            batch = self.dataset.batch(indices)
        else:
            collate = getattr(self.dataset, "collate", None) or default_collate
            if keys is None:
                batch = collate([self.dataset[i] for i in indices])
            else:
                batch = collate([self._seeded(i, int(k)) for i, k in zip(indices, keys, strict=True)])
        return (*batch, keys) if keys is not None else tuple(batch)

    def __getitem__(self, item: Any) -> Tuple[Tensor, ...]:
        return tuple(x[0] for x in self.__getitems__([item]))

    def _seeded(self, index: int, key: int) -> Any:
        # the CPU generator alone: torch.manual_seed also seeds every accelerator (100 us a call)
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(key)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


def _batched(batch: Any) -> Any:
    # KeyedBatches.__getitems__ already returns the collated batch
    return batch


# torch warns about more workers than cores at every loader start (training and validation,
# every epoch without persistent workers), in four lines; crate-lit says it once, in one
_WORKER_WARNING = "This DataLoader will create"
_warned_worker_counts: set = set()


def _check_worker_count(workers: int) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers <= cores:
        return
    warnings.filterwarnings("ignore", message=_WORKER_WARNING, category=UserWarning)
    if (workers, cores) not in _warned_worker_counts:
        _warned_worker_counts.add((workers, cores))
        log.warning(
            "data.num_workers=%d is more than the %d CPU cores this process may use: the extra workers "
            "wait for a core and take memory; set data.num_workers=%d or fewer",
            workers, cores, cores,
        )  # fmt: skip


def make_loader(
    dataset: Dataset,
    hp: Any,
    train: bool,
    trainer: Optional[L.Trainer] = None,
    batch_size: Optional[int] = None,
    resume_at: Optional[Tuple[int, int]] = None,
) -> DataLoader:
    """A DataLoader from a DataModule's hyper-parameters (batch size, workers, pinning).

    Training loaders shuffle with ``EpochSampler``, split over the trainer's DDP ranks and
    positioned at the trainer's epoch (the first batch is fetched before Lightning calls
    ``set_epoch``, so a resumed run must start at the right epoch here). ``resume_at=(epoch,
    n)`` leaves out the first n images of this rank's share of that epoch (a run resumed
    mid-epoch).
    """
    _check_worker_count(hp.num_workers)
    sampler = None
    if train:
        world, rank, epoch = 1, 0, 0
        if trainer is not None:
            world, rank = trainer.world_size, trainer.global_rank
            epoch = trainer.fit_loop.epoch_progress.current.processed
        sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=global_seed())
        sampler.set_epoch(epoch)
    batch_size = hp.batch_size if batch_size is None else batch_size
    per_rank = len(dataset) // (sampler.num_replicas if sampler is not None else 1)  # type: ignore[arg-type]
    if sampler is not None:
        sampler.resume_at = resume_at
    return DataLoader(
        KeyedBatches(dataset, keyed=train),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and per_rank >= batch_size,
        num_workers=hp.num_workers,
        collate_fn=_batched,
        pin_memory=hp.pin_memory and torch.cuda.is_available(),
        persistent_workers=hp.persistent_workers and hp.num_workers > 0,
    )


class ImageDataModule(L.LightningDataModule):
    """What every crate-lit data module shares: uint8 batches from ``train_set``/``val_set``,
    made model inputs on the device by ``train_batch`` (batch-level random transforms, then
    ``mean``/``std`` normalisation) and ``eval_batch``.

    Subclasses set ``train_set`` and ``val_set`` in ``setup`` (datasets whose items are
    ``(uint8 image (3, H, W), label, ...)``) and override ``train_batch``/``eval_batch`` for
    their device-side transforms.
    """

    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    # whether num_classes=None means "the classes the files hold" (a generated dataset needs a count)
    takes_classes_as_found = False

    def __init__(self) -> None:
        super().__init__()
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self._scale: Dict[str, Tuple[Tensor, Tensor]] = {}
        self._resume_position: Dict[str, int] = {}

    def normalize(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) on the 0-255 scale (uint8, or float from a batch transform) as
        float32 ``(x / 255 - mean) / std``, on their device."""
        slot = str(images.device)
        if slot not in self._scale:
            std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
            mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
            self._scale[slot] = (1.0 / (255.0 * std), mean / std)
        scale, shift = self._scale[slot]
        # a product into a new float32 tensor, then an in-place shift: torch.addcmul with the
        # broadcast (1, 3, 1, 1) shift as its input ran 4-5x slower on the CPU in some processes
        # and not in others (22-24 ms against about 5 ms for a 32 x 224 px batch; cause not found)
        return torch.mul(images, scale).sub_(shift)

    def train_batch(self, images: Tensor, keys: Tensor) -> Tensor:
        """A training batch as the model takes it: uint8 in, the batch-level random transforms
        (drawn from the images' keys), normalised float out. The base only normalises."""
        return self.normalize(images)

    def eval_batch(self, images: Tensor) -> Tensor:
        """An evaluation batch (uint8, from ``val_set`` or ``train_images_for_eval``) as the
        model takes it: what validation, the white-box monitor and crate-analyze feed it."""
        return self.normalize(images)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            images, labels, keys = batch
            return self.train_batch(images, keys), labels
        images, *rest = batch
        return (self.eval_batch(images), *rest)

    # A checkpoint records how far into its epoch training was, so that a run resumed from a
    # mid-epoch checkpoint (e.g. every_n_train_steps) trains on the rest of that epoch's batches.
    # Kept by the data module: Lightning restores its state before it asks for the training
    # loader, which configure_optimizers' estimated_stepping_batches requests before the loops'
    # state (and with it a stateful loader's) is restored.

    def state_dict(self) -> Dict[str, int]:
        if self.trainer is None:
            return {}
        loop = self.trainer.fit_loop
        progress = loop.epoch_loop.batch_progress
        # processed, not completed: a checkpoint written in on_train_batch_end already holds
        # that batch's optimizer step, and Lightning resumes after it; one written at the end
        # of an epoch resumes at the start of the next, skipping nothing
        return {
            "epoch": loop.epoch_progress.current.processed,
            "batches": 0 if progress.is_last_batch else progress.current.processed,
            "batch_size": int(self.hparams.batch_size),
        }

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self._resume_position = dict(state)
        if state.get("batches"):
            # this data module continues the epoch where the checkpoint left it
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")

    def train_dataloader(self) -> DataLoader:
        position, self._resume_position = self._resume_position, {}
        resume_at = (position["epoch"], position["batches"] * position["batch_size"]) if position else None
        return make_loader(self.train_set, self.hparams, True, trainer=self.trainer, resume_at=resume_at)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, self.hparams, train=False)

    def train_images_for_eval(self) -> Dataset:
        """The training split as evaluation sees images (no random transform): what k-NN
        memories and linear probes are fitted on."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# shapes


class ShapesDataModule(ImageDataModule):
    """The built-in shapes dataset: each split generated once (vectorised over images) and
    cached on disk under ``cache_dir``, keyed by its settings and the generator's version;
    flips and translations of training batches run on the device."""

    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(
        self,
        image_size: int = 32,
        num_classes: int = 10,
        train_size: int = 12000,
        val_size: int = 2000,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        augment: bool = True,
        shape_scale: Tuple[float, float] = DEFAULT_SCALE,
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # fail at construction, not in setup, on impossible arguments
        ShapesDataset("val", size=1, image_size=image_size, num_classes=num_classes, shape_scale=shape_scale)
        self._cache_unwritable = False
        # splits generated by this process (prepare_data), so that setup does not read them back
        self._generated: Dict[Tuple[str, int], Tuple[Tensor, Tensor, Tensor]] = {}

    def train_batch(self, images: Tensor, keys: Tensor) -> Tensor:
        if self.hparams.augment:
            # RandomHorizontalFlip + RandomCrop(size, padding=size // 8, reflect), per image
            pad = self.hparams.image_size // 8
            u = key_uniform(keys, stream=1, count=3)
            shifts = (u[:, 1:] * (2 * pad + 1)).to(torch.int64).clamp(max=2 * pad) - pad
            images = flip_and_translate(images, u[:, 0] < 0.5, shifts[:, 0], shifts[:, 1])
        return self.normalize(images)

    # -- the on-disk cache

    def _settings(self, split: str, size: int) -> Dict[str, Any]:
        hp = self.hparams
        return {
            "generator_version": shapes.GENERATOR_VERSION,
            "split": split,
            "size": int(size),
            "image_size": int(hp.image_size),
            "num_classes": int(hp.num_classes),
            "seed": int(hp.seed),
            "shape_scale": [float(v) for v in hp.shape_scale],
        }

    def cache_path(self, split: str, size: int) -> Optional[Path]:
        """Where the split with these settings is cached (None: no cache_dir)."""
        if not self.hparams.cache_dir:
            return None
        settings = self._settings(split, size)
        digest = hashlib.blake2b(repr(sorted(settings.items())).encode(), digest_size=6).hexdigest()
        return (
            Path(str(self.hparams.cache_dir)).expanduser()
            / f"shapes-{split}-v{shapes.GENERATOR_VERSION}-{digest}.pt"
        )

    def _read_cache(self, path: Path, settings: Dict[str, Any]) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(content, dict) or content.get("settings") != settings:
                saved = content.get("settings") if isinstance(content, dict) else None
                log.warning(
                    "ignoring the shapes cache %s: it was written for other settings (%s), not this "
                    "run's; delete it and it is rebuilt", path, saved,
                )  # fmt: skip
                return None
            images, labels, masks = content["images"], content["labels"], content["masks"]
        except Exception as err:  # a truncated or foreign file: torch raises many types
            log.warning(
                "ignoring the shapes cache %s: unreadable (%s: %s); delete it and it is rebuilt",
                path, type(err).__name__, str(err).splitlines()[0] if str(err) else "",
            )  # fmt: skip
            return None
        n, s = settings["size"], settings["image_size"]
        if images.shape != (n, 3, s, s) or images.dtype != torch.uint8 or labels.shape != (n,):
            log.warning("ignoring the shapes cache %s: its arrays have the wrong shape; delete it", path)
            return None
        return images, labels, masks

    def _write_cache(
        self, path: Path, settings: Dict[str, Any], arrays: Tuple[Tensor, Tensor, Tensor]
    ) -> None:
        images, labels, masks = arrays
        content = {"settings": settings, "images": images, "labels": labels, "masks": masks}
        try:
            atomic_write(path, lambda handle: torch.save(content, handle))
        except OSError as err:
            self._cache_unwritable = True
            log.warning(
                "cannot write the shapes cache (%s); keeping the images in memory only: set "
                "data.cache_dir to a writable folder (or null) to silence this", err,
            )  # fmt: skip

    def _split(self, split: str, size: int, write: bool) -> InMemoryImages:
        if (split, size) in self._generated:
            return InMemoryImages(*self._generated[(split, size)])
        hp = self.hparams
        dataset = ShapesDataset(
            split,
            size=size,
            image_size=hp.image_size,
            num_classes=hp.num_classes,
            seed=hp.seed,
            shape_scale=hp.shape_scale,
        )
        path, settings = self.cache_path(split, size), self._settings(split, size)
        arrays = self._read_cache(path, settings) if path is not None and path.is_file() else None
        if arrays is None:
            arrays = dataset.materialize()
            if write and path is not None and not path.exists() and not self._cache_unwritable:
                self._write_cache(path, settings, arrays)
            self._generated[(split, size)] = arrays
        return InMemoryImages(*arrays)

    def _splits(self, stage: Optional[str]) -> List[Tuple[str, int]]:
        splits = [("val", self.hparams.val_size)]
        if stage in (None, "fit"):
            splits.insert(0, ("train", self.hparams.train_size))
        return splits

    def prepare_data(self) -> None:
        # one process per node generates and writes the cache; the others read it in setup
        # (Lightning runs prepare_data on local rank 0 and holds the other ranks at a barrier)
        for split, size in self._splits(None):
            path = self.cache_path(split, size)
            if path is not None and not path.exists() and not self._cache_unwritable:
                self._split(split, size, write=True)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._split("train", self.hparams.train_size, write=False)
        if self.val_set is None:
            self.val_set = self._split("val", self.hparams.val_size, write=False)

    def train_images_for_eval(self) -> Dataset:
        if self.train_set is None:
            self.setup("fit")
        return self.train_set
