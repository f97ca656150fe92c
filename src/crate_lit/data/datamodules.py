"""LightningDataModules. Each takes the *per-device* batch size; ``crate_lit.train``
derives it from the global ``data.batch_size``."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterator, Optional, Tuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2 as T

from .shapes import DEFAULT_SCALE, ShapesDataset


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


class EpochSampler(DistributedSampler):
    """Training order and augmentation as functions of (seed, epoch) alone.

    The order is ``DistributedSampler``'s permutation (so one process sees, batch by batch, the
    union of what the DDP ranks see), and each index comes paired with the seed of its random
    augmentation (``SeededSamples``). A run resumed from a checkpoint, a DDP run and a run with
    any number of workers therefore draw the same images with the same augmentations.
    """

    def __iter__(self) -> Iterator[Tuple[int, int]]:  # type: ignore[override]
        for index in super().__iter__():
            yield index, stable_seed(self.seed, self.epoch, index)


class SeededSamples(Dataset):
    """``dataset[index]`` with torch's random generator seeded for the sample: ``EpochSampler``
    hands out ``(index, seed)`` pairs."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        index, seed = key
        # the CPU generator alone: torch.manual_seed also seeds every accelerator (100 us a call)
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


def make_loader(dataset: Dataset, hp: Any, train: bool, trainer: Optional[L.Trainer] = None) -> DataLoader:
    """A DataLoader from a DataModule's hyper-parameters (batch size, workers, pinning).

    Training loaders shuffle with ``EpochSampler``, split over the trainer's DDP ranks and
    positioned at the trainer's epoch (the first batch is fetched before Lightning calls
    ``set_epoch``, so a resumed run must start at the right epoch here).
    """
    sampler = None
    if train:
        world, rank, epoch = 1, 0, 0
        if trainer is not None:
            world, rank = trainer.world_size, trainer.global_rank
            epoch = trainer.fit_loop.epoch_progress.current.processed
        sampler = EpochSampler(
            dataset,
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=global_seed(),
        )
        sampler.set_epoch(epoch)
        dataset = SeededSamples(dataset)
    per_rank = len(dataset) // (sampler.num_replicas if sampler is not None else 1)
    return DataLoader(
        dataset,
        batch_size=hp.batch_size,
        sampler=sampler,
        drop_last=train and per_rank >= hp.batch_size,
        num_workers=hp.num_workers,
        pin_memory=hp.pin_memory and torch.cuda.is_available(),
        persistent_workers=hp.persistent_workers and hp.num_workers > 0,
    )


class ShapesDataModule(L.LightningDataModule):
    """The built-in shapes dataset: generated once per split and kept in memory."""

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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        normalize = T.Normalize(self.mean, self.std)
        self.train_transform = (
            T.Compose(
                [
                    T.RandomHorizontalFlip(),
                    T.RandomCrop(image_size, padding=image_size // 8, padding_mode="reflect"),
                    normalize,
                ]
            )
            if augment
            else normalize
        )
        self.eval_transform = normalize
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        # fail at construction, not in a worker, on impossible arguments
        ShapesDataset("val", size=1, image_size=image_size, num_classes=num_classes, shape_scale=shape_scale)

    def _dataset(self, split: str, size: int, transform: Any) -> ShapesDataset:
        hp = self.hparams
        dataset = ShapesDataset(
            split,
            size=size,
            image_size=hp.image_size,
            num_classes=hp.num_classes,
            seed=hp.seed,
            transform=transform,
            shape_scale=hp.shape_scale,
        )
        dataset.materialize()  # generate once, before workers fork
        return dataset

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._dataset("train", self.hparams.train_size, self.train_transform)
        if self.val_set is None:
            self.val_set = self._dataset("val", self.hparams.val_size, self.eval_transform)

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.train_set, self.hparams, train=True, trainer=self.trainer)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, self.hparams, train=False)
