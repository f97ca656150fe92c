"""LightningModules: the training logic around the plain models in ``crate_lit.models``."""

from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from .models import create_model, load_pretrained
from .optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# model-config keys that are not constructor arguments
_MODEL_META_KEYS = ("name", "pretrained")


def build_model(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """A model from its config group: ``name`` plus constructor overrides; a ``pretrained``
    checkpoint (released or crate-lit) is loaded with the head replaced when classes differ."""
    overrides = {k: v for k, v in cfg.items() if k not in _MODEL_META_KEYS and v is not None}
    model = create_model(cfg["name"], **overrides)
    if cfg.get("pretrained"):
        result = load_pretrained(model, cfg["pretrained"])
        log.info("loaded %s (new head: %s)", cfg["pretrained"], bool(result.dropped_head))
    return model


def optimizers_with_schedule(module: L.LightningModule, optimizer_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """``configure_optimizers``' answer: the optimizer over ``module.model`` and its per-step
    schedule over the whole run."""
    optimizer = build_optimizer(module.model, optimizer_cfg)
    scheduler = build_scheduler(
        optimizer,
        module.hparams.scheduler,
        total_steps=int(module.trainer.estimated_stepping_batches),
        max_epochs=max(1, module.trainer.max_epochs or 1),
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class CrateClassifier(L.LightningModule):
    """Image classification: cross-entropy with label smoothing, top-1/top-5 accuracy,
    optimizer and per-step schedule from config."""

    def __init__(
        self,
        model: Dict[str, Any],
        optimizer: Dict[str, Any],
        scheduler: Dict[str, Any],
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        # plain containers only, so checkpoints load under torch.load(weights_only=True)
        self.save_hyperparameters()
        self.model = build_model(model)
        num_classes = self.model.num_classes
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1)
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1)
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
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
        return optimizers_with_schedule(self, self.hparams.optimizer)


class CrateMAEPretrainer(L.LightningModule):
    """CRATE-MAE pre-training with the MAE recipe: AdamW, no weight decay on 1-D parameters,
    ``lr = base_lr * global_batch / 256``, per-step warm-up then half-cosine."""

    def __init__(
        self,
        model: Dict[str, Any],
        optimizer: Dict[str, Any],
        scheduler: Dict[str, Any],
        mask_ratio: float = 0.75,
        global_batch_size: int = 256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(model)
        # the released model keeps an unused Linear; frozen so DDP finds no unused gradients
        self.model.decoder_embed.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> Any:
        return self.model(images, mask_ratio=self.hparams.mask_ratio)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self(batch[0])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, _, _ = self(batch[0])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Dict[str, Any]:
        args = dict(self.hparams.optimizer)
        base_lr = args.pop("lr")
        args["lr"] = base_lr * self.hparams.global_batch_size / 256
        return optimizers_with_schedule(self, args)


def to_container(cfg: Optional[Any]) -> Dict[str, Any]:
    """An OmegaConf node (or mapping) as a plain dict with interpolations resolved."""
    from omegaconf import OmegaConf

    if cfg is None:
        return {}
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)
