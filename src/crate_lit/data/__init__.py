"""Datasets and LightningDataModules."""

from .datamodules import ShapesDataModule
from .folders import CIFARDataModule, ImageNetDataModule
from .shapes import CLASS_NAMES, ShapesDataset

DATAMODULES = {"shapes": ShapesDataModule, "imagenet": ImageNetDataModule, "cifar": CIFARDataModule}

__all__ = [
    "CLASS_NAMES",
    "CIFARDataModule",
    "DATAMODULES",
    "ImageNetDataModule",
    "ShapesDataModule",
    "ShapesDataset",
]
