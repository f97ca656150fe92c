"""Optimizers and per-step learning-rate schedules built from the Hydra config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from timm.optim import Lion
from timm.optim._param_groups import param_groups_weight_decay
from torch import nn

OPTIMIZERS = {"adamw": torch.optim.AdamW, "lion": Lion, "sgd": torch.optim.SGD}
SCHEDULES = ("warmup_cosine", "constant")


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``cfg``: ``name`` (adamw, lion, sgd), ``lr``, ``weight_decay`` and the optimizer's own
    arguments. Weight decay applies only to parameters of two or more dimensions."""
    args = dict(cfg)
    name = args.pop("name", None)
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer.name {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    groups = param_groups_weight_decay(model, args.pop("weight_decay", 0.0))
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


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], total_steps: int, max_epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``cfg``: ``name`` (warmup_cosine or constant), ``warmup_epochs``, ``min_lr_ratio``."""
    name = cfg.get("name")
    if name not in SCHEDULES:
        raise ValueError(f"unknown scheduler.name {name!r}; choose one of {', '.join(SCHEDULES)}")
    steps_per_epoch = total_steps / max(1, max_epochs)
    warmup = int(round(float(cfg.get("warmup_epochs", 0)) * steps_per_epoch))
    min_ratio = 1.0 if name == "constant" else float(cfg.get("min_lr_ratio", 0.0))
    warmup = min(warmup, max(0, total_steps - 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total_steps, min_ratio))
