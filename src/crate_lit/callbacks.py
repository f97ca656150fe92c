"""Training callbacks: CRATE's white-box quantities measured while it trains, CRATE-MAE
reconstruction figures, and an EMA of weights."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import default_collate

from . import figures, flops, measures
from .modules import CrateClassifier, CrateMAEPretrainer

log = logging.getLogger(__name__)


class EMA(WeightAveraging):
    """An exponential moving average of the weights, updated after every optimizer step: it is
    what validation sees, what checkpoints hold under ``state_dict`` (the raw weights under
    ``current_model_state``, so a resumed run continues both) and what the model ends with."""

    def __init__(self, decay: float = 0.9999) -> None:
        check_ema_decay(decay)
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay

    def state_dict(self) -> dict:
        # the decay, so that resuming without ema_decay can name the value to give
        return {**super().state_dict(), "decay": self.decay}


def check_ema_decay(decay: Any) -> None:
    """Raise ValueError unless ``decay`` is a float in (0, 1) (``ema_decay`` may also be null:
    no EMA)."""
    if isinstance(decay, bool) or not isinstance(decay, float) or not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be null or a number in (0, 1) such as 0.9999, got {decay!r}")


def ema(decay: Optional[float] = None) -> Optional[EMA]:
    """The ``ema`` entry of the callbacks group (``decay: ${ema_decay}``): an :class:`EMA` of
    that decay, or None (no callback; crate-train leaves it out) when the decay is null."""
    return None if decay is None else EMA(decay)


class WhiteboxMonitor(L.Callback):
    """Every ``every_n_epochs`` validation epochs: the per-layer coding rate R^c and sparsity of
    ``num_images`` validation images spread evenly over the validation set (the same ones every
    epoch), logged to every active logger (``whitebox/*``), and a PNG of the class-token
    attention of every head at the last layer, saved in the run folder and sent to the loggers
    that take images (TensorBoard, wandb). ``whitebox/seconds`` logs its own cost."""

    def __init__(self, every_n_epochs: int = 1, num_images: int = 32, figure_images: int = 4) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.figure_images = figure_images
        self._images: Optional[torch.Tensor] = None

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        # while fitting only: a later trainer.validate (validate_best) is no further epoch
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not hasattr(model, "trace"):
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs or not trainer.is_global_zero:
            return
        started = time.perf_counter()
        if self._images is None:
            shown = spread_eval_images(trainer, self.num_images, pl_module.device)
            if shown is None:
                return
            self._images = shown[1]
        images = self._images
        trace = model.trace(images)
        metrics = {}
        for layer in measures.layerwise_stats(trace):
            metrics[f"whitebox/coding_rate_l{layer['layer']}"] = layer["coding_rate_mean"]
            metrics[f"whitebox/sparsity_l{layer['layer']}"] = layer["sparsity_mean"]
        maps = measures.cls_attention_maps(trace.layers[-1].attention, trace.extras["grid_size"])
        shown = maps[: self.figure_images]
        pictures = figures.denormalize(images[: self.figure_images], trainer.datamodule)
        folder = Path(trainer.default_root_dir) / "whitebox"
        path = figures.plot_attention_grid(
            pictures,
            shown,
            # the masks crate-analyze scores (its defaults: keep 0.6, bilinear)
            measures.attention_masks(shown, pictures.shape[-2:]),
            folder / f"attention-epoch{trainer.current_epoch:03d}.png",
            layer=len(trace.layers),
            depth=len(trace.layers),
            source="run " + "/".join(Path(trainer.default_root_dir).parts[-2:]),
            epoch=trainer.current_epoch,
            mask_rule="keep 0.6, bilinear",
        )
        metrics["whitebox/seconds"] = time.perf_counter() - started
        # with the epoch's validation metrics (same row, step and epoch); measured on rank 0 only,
        # so nothing to reduce over DDP ranks
        pl_module.log_dict(metrics, rank_zero_only=True)
        log_image_file(trainer.loggers, "whitebox/attention", path, trainer.global_step)


class ReconstructionFigures(L.Callback):
    """CRATE-MAE pre-training: after each validation epoch, a grid (original, masked input,
    reconstruction: the masked patches predicted, the visible ones pasted back) of ``num_images``
    validation images spread evenly over the validation set (the same ones, with the same
    masks, every epoch), saved as ``<run>/reconstructions/epoch<NNN>.png`` and sent to the
    loggers that take images (``mae/reconstructions``). Nothing for a module without
    ``reconstruct`` (a classifier)."""

    def __init__(self, num_images: int = 8) -> None:
        self.num_images = num_images
        # the grid's images (model inputs) and their labels, chosen once
        self._images: Optional[torch.Tensor] = None
        self.labels: List[int] = []

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reconstruct = getattr(pl_module, "reconstruct", None)
        # while fitting only: a later trainer.validate (validate_best) is no further epoch
        if reconstruct is None or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if not trainer.is_global_zero:
            return
        if self._images is None:
            # spread over the validation set: its first images are all of its first class when
            # it is sorted by class (image folders)
            shown = spread_eval_images(trainer, self.num_images, pl_module.device)
            if shown is None:
                return
            _, self._images, labels = shown
            self.labels = [int(label) for label in labels]
        images = self._images
        masked, reconstruction = reconstruct(images)
        datamodule = trainer.datamodule
        run = Path(trainer.default_root_dir)
        path = figures.plot_reconstructions(
            figures.denormalize(images, datamodule),
            figures.denormalize(masked, datamodule),
            figures.denormalize(reconstruction, datamodule),
            run / "reconstructions" / f"epoch{trainer.current_epoch:03d}.png",
            visible_pasted=True,
            mask_ratio=pl_module.hparams.get("mask_ratio"),
            source="run " + "/".join(run.parts[-2:]),
            epoch=trainer.current_epoch,
            row_labels=[f"class {label}" for label in self.labels],
        )
        log_image_file(trainer.loggers, "mae/reconstructions", path, trainer.global_step)


class ThroughputLogger(L.Callback):
    """Training images/s and the share of wall time spent waiting for data, per epoch
    (``perf/images_per_sec``, over all DDP ranks, and ``perf/data_wait_share``), and the model's
    training FLOPs per image and model FLOPs utilisation (``perf/flops_per_image``, ``perf/mfu``).

    Measured on the host: the wait is the time from the end of one training step to the start
    of the next (fetching the batch, moving it to the device, the device-side transforms'
    launch). A share near 0 means the model bounds the run; a large one means the input
    pipeline does (more workers, ``data.decode=gpu``, a cached dataset). The first step of an
    epoch (worker start-up, compilation) is left out.

    The FLOPs of a training step (forward + backward, :func:`crate_lit.flops.training_flops`) are
    counted once, on meta tensors shaped as the first training batch, for crate-lit's
    classification and CRATE-MAE modules. MFU is one device's images/s times those FLOPs over its
    peak FLOP/s: ``peak_tflops`` when given, else the GPU's from :data:`crate_lit.flops.PEAK_TFLOPS`
    for the trainer's precision; with neither (a CPU, another GPU) MFU is not logged.
    """

    def __init__(self, peak_tflops: Optional[float] = None) -> None:
        flops.check_peak_tflops(peak_tflops)
        self.peak_tflops = peak_tflops
        self._last_end: Optional[float] = None
        self._start = 0.0
        self._wait = self._total = 0.0
        self._images = 0
        self._counted = False
        # the peak this run is measured against (TFLOP/s of one device), set at the start of fit
        self.peak: Optional[float] = None
        self.flops_per_image: Optional[float] = None
        # the last epoch's figures, for summary.json
        self.images_per_sec: Optional[float] = None
        self.mfu: Optional[float] = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        self.peak = self.peak_tflops or flops.device_peak_tflops(device, str(trainer.precision))
        if not trainer.is_global_zero:
            return
        if self.peak is None:
            log.info(
                "perf/mfu is not logged: the peak FLOP/s of %s at trainer.precision=%s is not known; "
                "give callbacks.throughput.peak_tflops=<peak TFLOP/s of one device> to log it",
                flops.device_description(device),
                trainer.precision,
            )
        else:
            given = "callbacks.throughput.peak_tflops"
            source = given if self.peak_tflops else flops.device_description(device)
            log.info("perf/mfu against a peak of %g TFLOP/s per device (%s)", self.peak, source)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end, self._wait, self._total, self._images = None, 0.0, 0.0, 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._counted:  # before the step's clock starts (the first step is not timed anyway)
            self._counted = True
            self.flops_per_image = self._count_flops(trainer, pl_module, batch)
        self._start = time.perf_counter()

    def _count_flops(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> Optional[float]:
        images = batch[0]
        if isinstance(pl_module, CrateMAEPretrainer):
            labels = None
        elif isinstance(pl_module, CrateClassifier):
            labels = batch[1]
        else:  # another module's training loss is its own: no count rather than a guess
            return None
        try:
            mask_ratio = float(pl_module.hparams.get("mask_ratio", 0.75))
            total = flops.training_flops(pl_module.model, images, labels, mask_ratio=mask_ratio)
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
            # a model that cannot run on meta tensors: the run goes on, without FLOPs
            if trainer.is_global_zero:
                log.warning("perf/flops_per_image and perf/mfu are not logged: counting failed (%s)", err)
            return None
        return total / len(images)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._wait += self._start - self._last_end
            self._total += now - self._last_end
            self._images += len(batch[0])
        self._last_end = now

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._total <= 0:
            return
        rate = self._images / self._total
        # each rank measures its own share; images/s adds up over ranks
        self.images_per_sec = rate * trainer.world_size
        metrics = {
            "perf/images_per_sec": self.images_per_sec,
            "perf/data_wait_share": self._wait / self._total,
        }
        if self.flops_per_image is not None:
            metrics["perf/flops_per_image"] = self.flops_per_image
            if self.peak is not None:
                # this rank's rate against one device's peak: the same share as the global rate
                # against the peak of all devices
                self.mfu = flops.mfu(rate, self.flops_per_image, self.peak)
                metrics["perf/mfu"] = self.mfu
        pl_module.log_dict(metrics, sync_dist=False, rank_zero_only=True)

    def summary(self) -> Dict[str, Optional[float]]:
        """summary.json's ``throughput``: FLOPs per image, the last epoch's images/s (all ranks)
        and MFU, and the peak TFLOP/s of one device that MFU is measured against."""
        return {
            "flops_per_image": self.flops_per_image,
            "images_per_sec": self.images_per_sec,
            "mfu": self.mfu,
            "peak_tflops": self.peak,
        }


def spread_indices(size: int, count: int) -> List[int]:
    """``count`` indices spread evenly over ``range(size)`` (the middle of each of ``count``
    equal stretches; all of them when ``count >= size``): on a validation set sorted by class
    (image folders) they fall in as many classes as they can, where its first ``count`` images
    would all be of its first class; and they are the same in every epoch and run."""
    if count >= size:
        return list(range(size))
    return [(2 * i + 1) * size // (2 * count) for i in range(count)]


def spread_eval_images(
    trainer: L.Trainer, count: int, device: torch.device
) -> Optional[Tuple[List[int], torch.Tensor, torch.Tensor]]:
    """The indices of ``count`` validation images at :func:`spread_indices`, the images as model
    inputs on ``device`` (the loader's uint8 images made inputs as validation batches are) and
    their labels; None without a validation loader."""
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    if loader is None:
        return None
    dataset = loader.dataset
    indices = spread_indices(len(dataset), count)
    # crate-lit's loaders read a batch at once (KeyedBatches.__getitems__); others image by image
    fetch = getattr(dataset, "__getitems__", None)
    batch = fetch(indices) if fetch is not None else default_collate([dataset[i] for i in indices])
    images = batch[0].to(device)
    to_input = getattr(trainer.datamodule, "eval_batch", None)
    images = to_input(images) if to_input is not None else images.float()
    return indices, images, torch.as_tensor(batch[1])


def log_image_file(loggers: Any, key: str, path: Path, step: int) -> None:
    """Send a saved PNG to each logger that takes images (TensorBoard, wandb)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step)
        elif isinstance(logger, TensorBoardLogger):
            import numpy as np
            from PIL import Image

            with Image.open(path) as picture:
                array = np.asarray(picture.convert("RGB"))
            logger.experiment.add_image(key, array, step, dataformats="HWC")
