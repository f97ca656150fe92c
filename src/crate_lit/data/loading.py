"""The loading shared by every dataset: samplers, batch fetching, the DataLoader and the
``ImageDataModule`` base.

Workers hand **uint8** batches (B, 3, H, W) to the device; ``on_after_batch_transfer`` turns
them into normalised float there and applies the batch-level random transforms (flips,
translations, erasing: ``augment``), on the GPU when there is one and on the CPU otherwise,
with the same code. Training batches reach the module as ``(inputs, labels, keys)``. Each
DataModule takes the *per-device* batch size; ``crate_lit.train`` derives it from the global
``data.batch_size``.

Randomness is a function of (seed, epoch, image index) alone: ``EpochSampler`` gives every
training image a 63-bit key, per-sample work in workers runs under torch's generator seeded with
it, and the device side draws its numbers from the keys with a counter-based hash
(``augment.key_uniform``). A run with any worker count, resumed or not, on one process or split
over DDP ranks, therefore sees the same images with the same augmentations.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from ..seeding import global_seed, stable_seed

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A dataset file that cannot be used (unreadable image, malformed batch); names the file."""


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
            # the keys go on with the batch: the module's mixup/cutmix draws from them too
            return self.train_batch(images, keys), labels, keys
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
