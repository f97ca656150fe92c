"""Datasets and LightningDataModules."""

from .cifar import CIFARDataModule
from .imagenet import ImageNetDataModule, ImageNetShardsDataModule
from .loading import ImageDataModule, InMemoryImages
from .shapes import CLASS_NAMES, ShapesDataModule, ShapesDataset

DATAMODULES = {
    "shapes": ShapesDataModule,
    "imagenet": ImageNetDataModule,
    "imagenet_shards": ImageNetShardsDataModule,
    "cifar": CIFARDataModule,
}

__all__ = [
    "CLASS_NAMES",
    "CIFARDataModule",
    "DATAMODULES",
    "ImageDataModule",
    "ImageNetDataModule",
    "ImageNetShardsDataModule",
    "InMemoryImages",
    "ShapesDataModule",
    "ShapesDataset",
]
