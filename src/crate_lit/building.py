"""The run's parts from its config: the data module, the Lightning module, the callbacks and
loggers, and the Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CUDAAccelerator
from omegaconf import DictConfig

from .configs import to_container
from .data import DATAMODULES
from .modules import CrateClassifier, CrateMAEPretrainer
from .runs import AtomicCheckpointIO, RunClock
from .validation import ConfigError, per_device_batch_size


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    args = to_container(cfg.data)
    name = args.pop("name")
    args["batch_size"] = per_device_batch_size(cfg)
    if cfg.get("task") == "mae" and getattr(DATAMODULES.get(name), "takes_classes_as_found", False):
        args["num_classes"] = None  # pre-training uses no labels: any number of class folders will do
    try:
        return DATAMODULES[name](**args)
    except TypeError as err:
        raise ConfigError(f"data={name}: {err}") from None


def build_module(cfg: DictConfig) -> L.LightningModule:
    """The LightningModule of ``cfg.task``."""
    common = {
        "model": to_container(cfg.model),
        "optimizer": to_container(cfg.optimizer),
        "scheduler": to_container(cfg.scheduler),
    }
    if cfg.task == "mae":
        return CrateMAEPretrainer(
            **common,
            mask_ratio=float(cfg.mask_ratio),
            global_batch_size=int(cfg.data.batch_size),
        )
    return CrateClassifier(
        **common,
        label_smoothing=float(cfg.label_smoothing),
        linear_probe=cfg.task == "linear_probe",
        mixup=to_container(cfg.get("mixup")),
    )


def instantiate_group(group: Any) -> List[Any]:
    """The objects of a config group's entries; an entry that is null, or whose target gives
    None (``crate_lit.callbacks.ema`` with ``ema_decay=null``), adds nothing."""
    objects = [instantiate(node) for node in (group or {}).values() if node is not None]
    return [obj for obj in objects if obj is not None]


def build_callbacks(cfg: DictConfig, clock: RunClock, loggers: List[Any]) -> List[Any]:
    """The ``callbacks`` group (its ``ema`` entry: an EMA of the weights when ``ema_decay`` is
    set), then the run clock."""
    callbacks = instantiate_group(cfg.get("callbacks"))
    callbacks.append(clock)
    if not loggers:  # logger=none: nothing would receive the learning rate
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    return callbacks


def build_trainer(cfg: DictConfig, output_dir: Path, callbacks: List[Any], loggers: List[Any]) -> L.Trainer:
    """The Trainer; on a CUDA GPU with ``float32_matmul_precision`` set for float32 matrix
    products (a CPU keeps torch's default)."""
    trainer = L.Trainer(
        **to_container(cfg.trainer),
        default_root_dir=str(output_dir),
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
    )
    if isinstance(trainer.accelerator, CUDAAccelerator):
        torch.set_float32_matmul_precision(str(cfg.get("float32_matmul_precision", "high")))
    return trainer
