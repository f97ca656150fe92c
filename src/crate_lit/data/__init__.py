"""Datasets and LightningDataModules."""

from .datamodules import ImageDataModule, InMemoryImages, ShapesDataModule
from .folders import CIFARDataModule, ImageNetDataModule, ImageNetShardsDataModule
from .shapes import CLASS_NAMES, ShapesDataset

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
