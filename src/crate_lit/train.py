"""``crate-train``: compose the Hydra config, train, and write ``summary.json``.

With no arguments it is the CPU demo: a small CRATE on the built-in shapes dataset.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data import DATAMODULES
from .modules import CrateClassifier, to_container
from .optim import OPTIMIZERS, SCHEDULES

log = logging.getLogger("crate_lit.train")


def config_dir() -> str:
    """The packaged ``conf/`` (inside the wheel) or, in a source checkout, the top-level one."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")


class ConfigError(ValueError):
    """A config value that cannot work; reported as one line."""


# Errors a user can cause with a config value; reported in one line before training starts.
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, OmegaConfBaseException)


def _require_int(cfg: DictConfig, key: str, minimum: int = 1) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def per_device_batch_size(cfg: DictConfig) -> int:
    """``data.batch_size`` is global: split it over devices x nodes x gradient accumulation."""
    batch = _require_int(cfg, "data.batch_size")
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    if str(devices) in ("auto", "-1"):
        devices = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    elif not isinstance(devices, int):  # a list of device ids
        devices = len(devices) if OmegaConf.is_list(devices) or isinstance(devices, list) else 1
    nodes = OmegaConf.select(cfg, "trainer.num_nodes", default=1)
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1)
    split = devices * nodes * accumulate
    if batch % split:
        raise ConfigError(
            f"data.batch_size={batch} (global) does not divide over {split} "
            "(devices x num_nodes x accumulate_grad_batches); choose a multiple of it"
        )
    return batch // split


def validate(cfg: DictConfig) -> None:
    """Catch the common typos in values before anything is built."""
    for key in ("data.image_size", "data.num_classes", "trainer.max_epochs"):
        _require_int(cfg, key)
    lr = OmegaConf.select(cfg, "optimizer.lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"optimizer.lr must be a positive number, got {lr!r}")
    for group, names in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULES)):
        if OmegaConf.select(cfg, f"{group}.name") not in names:
            raise ConfigError(
                f"unknown {group}.name {OmegaConf.select(cfg, f'{group}.name')!r}; "
                f"choose one of {', '.join(names)}"
            )
    if cfg.data.name not in DATAMODULES:
        raise ConfigError(f"unknown data.name {cfg.data.name!r}; choose one of {', '.join(DATAMODULES)}")
    if str(OmegaConf.select(cfg, "model.name")).startswith("mae_"):
        raise ConfigError(
            f"model.name={cfg.model.name} is a CRATE-MAE model, which has no classifier; "
            "crate-train classifies, so choose a CRATE classifier (e.g. model=crate_tiny)"
        )
    patch = OmegaConf.select(cfg, "model.patch_size")
    if isinstance(patch, int) and cfg.data.image_size % patch:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is not divisible by model.patch_size={patch}; "
            "choose an image size that is a multiple of the patch size"
        )


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    args = to_container(cfg.data)
    name = args.pop("name")
    args["batch_size"] = per_device_batch_size(cfg)
    try:
        return DATAMODULES[name](**args)
    except TypeError as err:
        raise ConfigError(f"data={name}: {err}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    if isinstance(err, hydra.errors.InstantiationException) and err.__cause__ is not None:
        text = f"{text.splitlines()[0]} {_first_line(err.__cause__)}"
    return text.splitlines()[0] if text else type(err).__name__


def _instantiate_group(group: Any) -> List[Any]:
    return [instantiate(node) for node in (group or {}).values() if node is not None]


def _metrics_file(loggers: List[Any]) -> str | None:
    for logger in loggers:
        if isinstance(logger, L.pytorch.loggers.CSVLogger):
            return os.path.join(logger.log_dir, "metrics.csv")
    return None


def _float_metrics(metrics: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items()) if torch.is_tensor(v) and v.numel() == 1}


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Train as configured; returns the summary also written to ``summary.json``."""
    started = time.time()
    output_dir = Path(cfg.paths.output_dir)
    try:  # everything a config value can break, reported as one line
        validate(cfg)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = build_datamodule(cfg)
        module = CrateClassifier(
            model=to_container(cfg.model),
            optimizer=to_container(cfg.optimizer),
            scheduler=to_container(cfg.scheduler),
            label_smoothing=float(cfg.label_smoothing),
        )
        callbacks = _instantiate_group(cfg.get("callbacks"))
        loggers = _instantiate_group(cfg.get("logger"))
        trainer = L.Trainer(
            **to_container(cfg.trainer),
            default_root_dir=str(output_dir),
            callbacks=callbacks,
            logger=loggers or False,
        )
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path not in (None, "last") and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; give a .ckpt file or 'last'")
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise ConfigError(_first_line(err)) from None

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    checkpoint = trainer.checkpoint_callback  # the first one: the best by its monitor
    last = [c.best_model_path for c in trainer.checkpoint_callbacks if getattr(c, "monitor", 1) is None]
    if cfg.get("validate_best") and checkpoint is not None and checkpoint.best_model_path:
        trainer.validate(module, datamodule=datamodule, ckpt_path=checkpoint.best_model_path)

    summary = {
        "metrics": _float_metrics(trainer.callback_metrics),
        "best": {
            "monitor": getattr(checkpoint, "monitor", None),
            "score": float(checkpoint.best_model_score)
            if getattr(checkpoint, "best_model_score", None) is not None
            else None,
        },
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "wall_time_s": round(time.time() - started, 2),
        "checkpoints": {
            "best": getattr(checkpoint, "best_model_path", "") or None,
            "last": (last[0] if last else getattr(checkpoint, "last_model_path", "")) or None,
        },
        "metrics_file": _metrics_file(loggers),
        "config": str(output_dir / ".hydra" / "config.yaml"),
        "output_dir": str(output_dir),
    }
    if trainer.is_global_zero:
        summary_path = output_dir / "summary.json"
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        _report(summary, summary_path)
    return summary


def _report(summary: Dict[str, Any], path: Path) -> None:
    m = {k: summary["metrics"].get(k, float("nan")) for k in ("val/acc1", "val/acc5")}
    lines = [
        f"validation top-1 {m['val/acc1']:.4f}, top-5 {m['val/acc5']:.4f} "
        f"after {summary['epochs']} epochs in {summary['wall_time_s']:.1f} s",
        f"checkpoint: {summary['checkpoints']['best'] or summary['checkpoints']['last']}",
        f"metrics:    {summary['metrics_file']}",
        f"config:     {summary['config']}",
        f"summary:    {path}",
    ]
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg)
    except ConfigError as err:
        print(f"crate-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    # the value Hydra sweepers (Optuna) optimise
    return summary["metrics"].get("val/acc1")


if __name__ == "__main__":
    main()
