"""LightningDataModules. Each takes the *per-device* batch size; ``crate_lit.train``
derives it from the global ``data.batch_size``."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from .shapes import ShapesDataset


def make_loader(dataset: Dataset, hp: Any, train: bool) -> DataLoader:
    """A DataLoader from a DataModule's hyper-parameters (batch size, workers, pinning)."""
    return DataLoader(
        dataset,
        batch_size=hp.batch_size,
        shuffle=train,
        drop_last=train and len(dataset) >= hp.batch_size,
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
        ShapesDataset("val", size=1, image_size=image_size, num_classes=num_classes)

    def _dataset(self, split: str, size: int, transform: Any) -> ShapesDataset:
        hp = self.hparams
        dataset = ShapesDataset(
            split,
            size=size,
            image_size=hp.image_size,
            num_classes=hp.num_classes,
            seed=hp.seed,
            transform=transform,
        )
        dataset.materialize()  # generate once, before workers fork
        return dataset

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._dataset("train", self.hparams.train_size, self.train_transform)
        if self.val_set is None:
            self.val_set = self._dataset("val", self.hparams.val_size, self.eval_transform)

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.train_set, self.hparams, train=True)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, self.hparams, train=False)
