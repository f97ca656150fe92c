"""Datasets and LightningDataModules."""

from .datamodules import ShapesDataModule
from .shapes import CLASS_NAMES, ShapesDataset

DATAMODULES = {"shapes": ShapesDataModule}

__all__ = ["CLASS_NAMES", "DATAMODULES", "ShapesDataModule", "ShapesDataset"]
