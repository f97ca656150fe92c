"""LightningModules: the training logic around the plain models in ``crate_lit.models``."""

from __future__ import annotations

import logging
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from .data.augment import MIXING_OFF, mixup_cutmix
from .models import CrateMAEClassifier, create_model, load_pretrained
from .optim import build_optimizer, build_scheduler, optimizer_steps_per_epoch
from .seeding import global_seed, stable_seed

log = logging.getLogger(__name__)

# model-config keys that are not constructor arguments
_MODEL_META_KEYS = ("name", "pretrained")
# what crate-train does: train a classifier, pre-train a CRATE-MAE, or fit a linear probe on a
# frozen backbone (a CRATE classifier or a CRATE-MAE encoder)
TASKS = ("classify", "mae", "linear_probe")


def is_mae(name: str) -> bool:
    return str(name).startswith("mae_")


def build_model(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """A model from its config group: ``name`` plus constructor overrides; a ``pretrained``
    checkpoint (released or crate-lit) is loaded with the head replaced when classes differ."""
    overrides = {k: v for k, v in cfg.items() if k not in _MODEL_META_KEYS and v is not None}
    try:
        model = create_model(cfg["name"], **overrides)
    except TypeError as err:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown is None:
            raise
        raise TypeError(
            f"model.{unknown.group(1)} is no setting of model {cfg['name']}; a model of another family "
            f"is chosen with the group (model={cfg['name']}), not with model.name="
        ) from None
    if cfg.get("pretrained"):
        result = load_pretrained(model, cfg["pretrained"])
        log.info("loaded %s (new head: %s)", cfg["pretrained"], bool(result.dropped_head))
    return model


def build_classifier(cfg: Mapping[str, Any], linear_probe: bool = False) -> torch.nn.Module:
    """``build_model`` for classification: a CRATE-MAE model becomes its encoder with a head
    (``CrateMAEClassifier``): the MAE recipe's linear probe, or its fine-tuning head."""
    if not is_mae(cfg["name"]):
        return build_model(cfg)
    encoder = build_model({**cfg, "pretrained": None})
    classifier = CrateMAEClassifier(encoder, int(cfg["num_classes"]), probe=linear_probe)
    if cfg.get("pretrained"):
        load_pretrained(classifier, cfg["pretrained"])
        log.info("loaded %s into the encoder", cfg["pretrained"])
    return classifier


class ScheduledModule(L.LightningModule):
    """The optimizer over ``self.model`` and its per-step schedule over the whole run, as long as
    the run is now: a run resumed with a larger ``trainer.max_epochs`` (or ``max_steps``) keeps
    its step count, but its schedule is stretched to the new length (the checkpoint's schedule
    length is not restored), so the added epochs continue the warm-up + cosine instead of
    training at its floor."""

    _resumed_schedule: Optional[Dict[str, Any]] = None

    def optimizers_with_schedule(self, optimizer_cfg: Mapping[str, Any]) -> Dict[str, Any]:
        optimizer = build_optimizer(self.model, optimizer_cfg)
        scheduler = build_scheduler(
            optimizer,
            self.hparams.scheduler,
            total_steps=int(self.trainer.estimated_stepping_batches),
            steps_per_epoch=optimizer_steps_per_epoch(self.trainer),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # the one LambdaLR of optimizers_with_schedule: its step count is restored, its length not
        (state,) = checkpoint.get("lr_schedulers") or [{}]
        saved = state.get("lr_lambdas")
        if saved:
            self._resumed_schedule = saved[0]
            state["lr_lambdas"] = [None] * len(saved)

    def on_train_start(self) -> None:
        saved, self._resumed_schedule = self._resumed_schedule, None
        if saved is None:
            return
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        schedule = scheduler.lr_lambdas[0]
        if saved == vars(schedule):
            return
        log.warning(
            "resuming at step %d with a schedule of %d steps (the checkpoint's had %d): the "
            "learning rate follows the new schedule from here",
            scheduler.last_epoch, schedule.total_steps, saved.get("total_steps", -1),
        )  # fmt: skip
        # the optimizer's restored rates are the old schedule's: set this step's new ones
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * schedule(scheduler.last_epoch)


class CrateClassifier(ScheduledModule):
    """Image classification: cross-entropy with label smoothing, top-1/top-5 accuracy,
    optimizer and per-step schedule from config. ``linear_probe`` freezes everything but a
    new classifier head, and keeps the frozen part in eval mode. A CRATE-MAE model is its
    encoder with a new head: the linear probe's, or fine-tuned whole (MAE's fine-tuning).
    ``mixup`` (conf/train.yaml's block: mixup_alpha, cutmix_alpha, prob, switch_prob) mixes
    training batches (``augment.mixup_cutmix``); ``train/acc1`` is then the soft-target
    accuracy, the mixed target's weight on the predicted class averaged over images."""

    def __init__(
        self,
        model: Dict[str, Any],
        optimizer: Dict[str, Any],
        scheduler: Dict[str, Any],
        label_smoothing: float = 0.1,
        linear_probe: bool = False,
        mixup: Optional[Dict[str, float]] = None,
    ) -> None:
        super().__init__()
        # plain containers only, so checkpoints load under torch.load(weights_only=True)
        self.save_hyperparameters(logger=False)
        # None (and checkpoints from before mixing existed): the yaml's off values
        self.hparams.mixup = {**MIXING_OFF, **(mixup or {})}
        self.model = build_classifier(model, linear_probe)
        num_classes = self.model.num_classes
        if linear_probe:
            self.model.requires_grad_(False)
            if not isinstance(self.model, CrateMAEClassifier):
                self.model.reset_classifier(num_classes)  # a probe trains a fresh head
            self.model.get_classifier().requires_grad_(True)
        # the target's weight on the predicted class, averaged over all images: top-1 accuracy
        # (micro) for plain labels, and its soft version for mixed ones. No NaN check: that
        # would wait on the device at every step
        self.train_acc = MeanMetric(nan_strategy="disable")
        # top-k accuracy over all images (micro), not torchmetrics' default mean of per-class recalls
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")

    def train(self, mode: bool = True) -> CrateClassifier:
        super().train(mode)
        if mode and self.hparams.linear_probe:
            self.model.eval()
            self.model.get_classifier().train()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        mixing = self.hparams.mixup
        targets = None
        if mixing["mixup_alpha"] > 0 or mixing["cutmix_alpha"] > 0:
            if len(batch) < 3:
                raise ValueError(
                    "mixup/cutmix draws from each image's key, but this training batch has none; "
                    "train with a crate-lit data module, whose batches are (images, labels, keys)"
                )
            images, targets = mixup_cutmix(images, labels, batch[2], self.model.num_classes, **mixing)
        logits = self(images)
        smoothing = self.hparams.label_smoothing
        if targets is None:
            loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
            hits = (logits.argmax(1) == labels).float()
        else:
            # torch smooths probability targets as (1 - s) * t + s / C, which is timm's
            # mixup_target(..., smoothing=s) of the same mix: with it, SoftTargetCrossEntropy
            loss = F.cross_entropy(logits, targets, label_smoothing=smoothing)
            hits = targets.gather(1, logits.argmax(1, keepdim=True))[:, 0]
        self.train_acc(hits)
        # averaged over DDP ranks: the loss of the global batch, as one process would log it
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/acc1", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch[0], batch[1]
        logits = self(images)
        self.val_acc1(logits, labels)
        self.val_acc5(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log("val/acc1", self.val_acc1, prog_bar=True)
        self.log("val/acc5", self.val_acc5)

    def configure_optimizers(self) -> Dict[str, Any]:
        return self.optimizers_with_schedule(self.hparams.optimizer)


class CrateMAEPretrainer(ScheduledModule):
    """CRATE-MAE pre-training with the MAE recipe: AdamW, no weight decay on 1-D parameters,
    ``lr = base_lr * global_batch / 256``, per-step warm-up then half-cosine. The masking noise
    of each step is seeded by (seed, step, rank), so a resumed run masks as the original would.
    :meth:`reconstruct` gives the masked input and reconstruction of some images, which the
    ``ReconstructionFigures`` callback (``crate_lit.callbacks``) draws after each validation
    epoch."""

    def __init__(
        self,
        model: Dict[str, Any],
        optimizer: Dict[str, Any],
        scheduler: Dict[str, Any],
        mask_ratio: float = 0.75,
        global_batch_size: int = 256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.model = build_model(model)
        # the released model keeps an unused Linear; frozen so DDP finds no unused gradients
        self.model.decoder_embed.requires_grad_(False)

    def _noise(self, batch: int, step: int, split: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(stable_seed(global_seed(), split, step, self.global_rank))
        return torch.rand(batch, self.model.patch_embed.num_patches, generator=generator).to(self.device)

    def forward(self, images: torch.Tensor, noise: Optional[torch.Tensor] = None) -> Any:
        return self.model(images, mask_ratio=self.hparams.mask_ratio, noise=noise)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0]
        loss, _, _ = self(images, self._noise(len(images), self.global_step, 0))
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images = batch[0]
        loss, _, _ = self(images, self._noise(len(images), batch_idx, 1))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The masked input and the reconstruction (the masked patches predicted, the visible
        ones pasted back) of ``images`` (model inputs), masked by the noise of the first
        validation batch: the same masks for the same images in every epoch."""
        _, pred, mask = self(images, self._noise(len(images), 0, 1))
        return self.model.reconstruction_images(images, pred, mask, paste_visible=True)

    def configure_optimizers(self) -> Dict[str, Any]:
        args = dict(self.hparams.optimizer)
        base_lr = args.pop("lr")
        args["lr"] = base_lr * self.hparams.global_batch_size / 256
        return self.optimizers_with_schedule(args)
