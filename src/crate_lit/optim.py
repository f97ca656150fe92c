"""Optimizers and per-step learning-rate schedules built from the Hydra config."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping

import torch
from timm.optim import Lion, param_groups_layer_decay, param_groups_weight_decay
from torch import nn

log = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": torch.optim.AdamW, "lion": Lion, "sgd": torch.optim.SGD}
# which parameters weight decay applies to (conf/optimizer/_optimizer.yaml says what each means)
DECAY_RULES = ("matrices", "model", "layer_weights")
# each schedule's config keys besides ``name``: conf/scheduler/<name>.yaml has exactly these
SCHEDULES = {"warmup_cosine": ("warmup_epochs", "min_lr_ratio"), "constant": ("warmup_epochs",)}


def no_decay_names(model: nn.Module, rule: str) -> List[str]:
    """The parameters of two or more dimensions that weight decay leaves alone under ``rule``
    (those of fewer dimensions never decay)."""
    if rule not in DECAY_RULES:
        raise ValueError(f"unknown optimizer.decayed {rule!r}; choose one of {', '.join(DECAY_RULES)}")
    if rule == "matrices":
        return []
    if rule == "model":
        return sorted(getattr(model, "no_weight_decay", set)())
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    weights = {id(m.weight) for m in model.modules() if isinstance(m, layers)}
    return [name for name, p in model.named_parameters() if id(p) not in weights]


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    decayed: str = "matrices",
    layer_decay: float | None = None,
) -> List[Dict[str, Any]]:
    """The trainable parameters in groups of one weight decay (``decayed``: which parameters it
    applies to) and, with ``layer_decay``, one learning rate per layer (timm's layer grouping,
    the model's ``group_matcher``: its embedding first, its head last)."""
    skip = no_decay_names(model, decayed)
    if layer_decay is None:
        return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"optimizer.layer_decay must be in (0, 1] or null, got {layer_decay}")
    groups = param_groups_layer_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay
    )
    # timm's schedulers apply lr_scale; the schedule here (LambdaLR) scales each group's own rate
    return [
        {**{k: v for k, v in group.items() if k != "lr_scale"}, "lr": lr * group["lr_scale"]}
        for group in groups
    ]


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``cfg``: ``name`` (adamw, lion, sgd), ``lr``, ``weight_decay``, ``decayed`` and
    ``layer_decay`` (:func:`param_groups`), and the optimizer's own arguments."""
    args = dict(cfg)
    name = args.pop("name", None)
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer.name {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(
        model,
        args["lr"],
        args.pop("weight_decay", 0.0),
        args.pop("decayed", "matrices"),
        args.pop("layer_decay", None),
    )
    if "betas" in args:
        args["betas"] = tuple(args["betas"])
    try:
        return OPTIMIZERS[name](groups, **args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"optimizer {name}: {err}; check the optimizer.* values") from None


@dataclass
class WarmupCosine:
    """LR multiplier per optimizer step: linear warm-up from 1/warmup to 1, then half a
    cosine down to ``min_ratio``. A dataclass, so LambdaLR checkpoints it as plain numbers."""

    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_steps_per_epoch(trainer: Any) -> float:
    """Optimizer steps in one epoch of ``trainer``'s training loader, as Lightning counts them
    (``limit_train_batches``, this process's share under DDP, one step per
    ``accumulate_grad_batches`` batches and one at the epoch's end); ``inf`` for a loader
    without a length. Independent of ``max_steps``, unlike ``estimated_stepping_batches``."""
    # estimated_stepping_batches sets up the training loader if the fit has not yet: before
    # that, num_training_batches is inf
    _ = trainer.estimated_stepping_batches
    batches = trainer.num_training_batches
    if math.isinf(batches):
        return math.inf
    return math.ceil(batches / trainer.accumulate_grad_batches)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], total_steps: int, steps_per_epoch: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """``cfg``: ``name`` (warmup_cosine or constant), ``warmup_epochs`` (epochs of the training
    loader: ``steps_per_epoch`` optimizer steps each, also when ``trainer.max_steps`` ends the
    run sooner, which then cuts the warm-up short) and, for warmup_cosine, ``min_lr_ratio`` (the
    last step's rate as a fraction of the peak). ``total_steps``: the run's optimizer steps."""
    name = cfg.get("name")
    if name not in SCHEDULES:
        raise ValueError(f"unknown scheduler.name {name!r}; choose one of {', '.join(SCHEDULES)}")
    unused = sorted(set(cfg) - {"name", *SCHEDULES[name]})
    if unused:
        # e.g. an experiment's min_lr_ratio for its cosine, with scheduler=constant chosen after it
        log.warning(
            "scheduler=%s does not use %s (its keys: %s): ignored",
            name, ", ".join(f"scheduler.{key}" for key in unused), ", ".join(SCHEDULES[name]),
        )  # fmt: skip
    warmup_epochs = float(cfg.get("warmup_epochs", 0))
    if warmup_epochs < 0:
        raise ValueError(f"scheduler.warmup_epochs must be >= 0, got {warmup_epochs:g}")
    if warmup_epochs == 0:
        warmup = 0
    elif math.isinf(steps_per_epoch):
        raise ValueError(
            "scheduler.warmup_epochs needs a training loader with a length (epochs of it); "
            "set scheduler.warmup_epochs=0"
        )
    else:
        warmup = min(int(round(warmup_epochs * steps_per_epoch)), total_steps)
    min_ratio = float(cfg.get("min_lr_ratio", 0.0)) if name == "warmup_cosine" else 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total_steps, min_ratio))
