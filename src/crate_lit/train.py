"""``crate-train``: compose the Hydra config, train, and write ``summary.json``.

With no arguments it is the CPU demo: a small CRATE on the built-in shapes dataset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

from .callbacks import EMA
from .configs import run_command
from .data import DATAMODULES
from .data.datamodules import DataError
from .loggers import AppendingCSVLogger, quiet_lightning_notices
from .models.factory import torch_file_format
from .modules import TASKS, CrateClassifier, CrateMAEPretrainer, is_mae, to_container
from .optim import OPTIMIZERS, SCHEDULES
from .runs import (
    AtomicCheckpointIO,
    RunClock,
    RunFolder,
    StopSignals,
    atomic_write_text,
    check_resume,
    config_dir,
    disk_full,
    explain,
    pasteable,
    read_checkpoint,
    stop_line,
    trained_anything,
)

log = logging.getLogger("crate_lit.train")


class ConfigError(ValueError):
    """A config value that cannot work; reported as one line."""


# Errors a user can cause with a config value; reported in one line before training starts.
USER_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    ImportError,  # an optional package a config needs (torch_xla, wandb, ...)
    OmegaConfBaseException,
    MisconfigurationException,  # Lightning's word for trainer values it cannot honour (e.g. no GPU)
)


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
    task, model = cfg.get("task"), str(OmegaConf.select(cfg, "model.name"))
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "classify" and is_mae(model):
        raise ConfigError(
            f"model={model} is a CRATE-MAE model, which has no classifier; for task=classify choose a "
            "CRATE classifier (e.g. model=crate_tiny), or pre-train it with task=mae "
            "(experiment=mae_pretrain) or probe its encoder with experiment=linear_probe"
        )
    ratio = cfg.get("mask_ratio")
    number = isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
    if task == "mae" and not (number and 0 <= ratio < 1):
        raise ConfigError(
            f"mask_ratio must be a number in [0, 1) (the share of patches removed), got {ratio!r}; "
            "the MAE recipe uses mask_ratio=0.75"
        )
    if task == "mae" and not is_mae(model):
        raise ConfigError(
            f"task=mae pre-trains a CRATE-MAE model, but model={model} is a classifier; "
            "choose one of the mae_* models (e.g. model=mae_crate_base)"
        )
    if not OmegaConf.select(cfg, "model.pretrained"):
        if task == "linear_probe":
            raise ConfigError(
                "task=linear_probe trains a head on a frozen pre-trained backbone, but model.pretrained "
                "is not set; give model.pretrained=<released .pth or crate-lit .ckpt>"
            )
        if cfg.get("require_pretrained"):
            raise ConfigError(
                f"{cfg.get('task_name', 'this recipe')} fine-tunes pre-trained weights, but model.pretrained "
                "is not set; give model.pretrained=<released .pth or crate-lit .ckpt>, or "
                "require_pretrained=false to train from scratch"
            )
    precision = str(OmegaConf.select(cfg, "trainer.precision"))
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator"))
    on_cpu = accelerator == "cpu" or accelerator == "auto" and not torch.cuda.is_available()
    if "16" in precision and on_cpu:
        log.warning(
            "trainer.precision=%s on the CPU: most CPUs have no 16-bit matrix units, so this runs "
            "several times slower than trainer.precision=32-true (use that here)",
            precision,
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
    if cfg.get("task") == "mae" and getattr(DATAMODULES.get(name), "takes_classes_as_found", False):
        args["num_classes"] = None  # pre-training uses no labels: any number of class folders will do
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
    if text.startswith("Caught ") and "Original Traceback" in text:
        # re-raised from a DataLoader worker: the original message is the traceback's last line
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(err).__name__


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
            num_reconstructions=int(cfg.get("num_reconstructions", 8)),
        )
    return CrateClassifier(
        **common, label_smoothing=float(cfg.label_smoothing), linear_probe=cfg.task == "linear_probe"
    )


def resolve_ckpt_path(cfg: DictConfig, output_dir: Path) -> str | None:
    """``ckpt_path``: null, ``last`` (this run folder's ``checkpoints/last.ckpt``) or a file."""
    value = cfg.get("ckpt_path")
    if value is None:
        return None
    path = output_dir / "checkpoints" / "last.ckpt" if value == "last" else Path(str(value)).expanduser()
    if not path.is_file():
        if value == "last":
            raise FileNotFoundError(
                f"ckpt_path=last: {path} does not exist; to resume an earlier run add "
                "hydra.run.dir=<that run's folder>, or give ckpt_path=<path to a .ckpt>"
            )
        raise FileNotFoundError(f"ckpt_path={value} does not exist; give a .ckpt file or 'last'")

    kind = torch_file_format(path)  # legacy-format files (older released weights) are no zip
    if kind is None:
        raise ValueError(
            f"ckpt_path={value} is not a PyTorch checkpoint (neither a torch.save zip archive nor its "
            "legacy format); give a crate-train .ckpt file or 'last'"
        )
    if kind == "zip" and not zipfile.is_zipfile(path):
        raise ValueError(f"ckpt_path={path} is not a readable PyTorch checkpoint (truncated or corrupt?)")
    return str(path)


# what Lightning's DDP launcher sets in the launching process
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def _ddp_launch_scope() -> Iterator[None]:
    """Lightning's DDP launcher starts the extra processes by re-running this command with
    ``hydra.run.dir`` set to the job's folder. In a multirun that command would be the whole
    sweep, so each job presents itself as a single run of its own overrides. Afterwards the
    process group and the launcher's environment go, so that the next job of the sweep starts
    its own processes instead of joining the finished ones."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    argv, env = list(sys.argv), {k: os.environ.get(k) for k in _DDP_ENV}
    if HydraConfig.initialized() and "LOCAL_RANK" not in os.environ:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
            with read_write(hydra_cfg):
                hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.argv[:] = argv
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _instantiate_group(group: Any) -> List[Any]:
    return [instantiate(node) for node in (group or {}).values() if node is not None]


def _metrics_file(loggers: List[Any]) -> str | None:
    for logger in loggers:
        if isinstance(logger, L.pytorch.loggers.CSVLogger):
            return os.path.join(logger.log_dir, "metrics.csv")
    return None


def _float_metrics(metrics: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items()) if torch.is_tensor(v) and v.numel() == 1}


def validate_checkpoint(
    trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule, path: str
) -> Dict[str, float]:
    """``validate_best``: the validation metrics of the checkpoint at ``path``, logged once more
    under ``best/`` at the run's last step (not as a further epoch) and returned for the summary."""
    loggers = trainer.loggers
    trainer.loggers = []  # Lightning would log them as the metrics of epoch max_epochs
    try:
        (metrics,) = trainer.validate(module, datamodule=datamodule, ckpt_path=path, verbose=False)
    finally:
        trainer.loggers = loggers
    metrics = {k: float(v) for k, v in sorted(metrics.items())}
    if trainer.is_global_zero:
        for logger in loggers:
            logger.log_metrics({f"best/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
            logger.save()
    return metrics


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Train as configured; returns the summary also written to ``summary.json``. A run stopped by
    Ctrl-C or ``kill`` writes a summary of what it reached, says how to resume it and exits with
    the shell's status for the signal (130, 143)."""
    started = time.time()
    output_dir = Path(cfg.paths.output_dir)
    quiet_lightning_notices()
    folder = RunFolder(output_dir, OmegaConf.select(cfg, "hydra.output_subdir", default=".hydra"))
    with StopSignals() as stop:
        trainer = None
        try:  # everything a config value can break, reported as one line
            validate(cfg)
            L.seed_everything(cfg.seed, workers=True, verbose=False)
            datamodule = build_datamodule(cfg)
            module = build_module(cfg)
            if cfg.get("compile"):
                module.model.compile()  # in place: parameter names (and checkpoints) stay unchanged
            callbacks = _instantiate_group(cfg.get("callbacks"))
            if cfg.get("ema_decay") is not None:
                callbacks.append(EMA(cfg.ema_decay))
            clock = RunClock(started)
            callbacks.append(clock)
            loggers = _instantiate_group(cfg.get("logger"))
            if not loggers:  # logger=none: nothing would receive the learning rate
                monitor = L.pytorch.callbacks.LearningRateMonitor
                callbacks = [c for c in callbacks if not isinstance(c, monitor)]
            # the loggers get the whole composed config instead of Lightning's merge of the module's and
            # the data module's hyper-parameters (whose keys clash, e.g. the run's and the data's seed)
            module._log_hyperparams = datamodule._log_hyperparams = False
            ckpt_path = resolve_ckpt_path(cfg, output_dir)
            resumed_from = None
            if ckpt_path is not None:
                checkpoint = read_checkpoint(ckpt_path)
                model = to_container(cfg.model)
                check_resume(checkpoint, ckpt_path, cfg.get("ema_decay"), model, module.state_dict())
                resumed_from = {
                    "checkpoint": ckpt_path,
                    "epoch": int(checkpoint["epoch"]),
                    "global_step": int(checkpoint["global_step"]),
                }
                del checkpoint
            trainer = L.Trainer(
                **to_container(cfg.trainer),
                default_root_dir=str(output_dir),
                callbacks=callbacks,
                logger=loggers or False,
                plugins=[AtomicCheckpointIO()],
            )
            # the first writes into the folder, after every check: a refused resume leaves its
            # hparams.yaml and metrics.csv as they were
            for logger in loggers:
                logger.log_hyperparams(to_container(cfg))
            for logger in loggers:  # the steps from the checkpoint on are trained (and logged) again
                if resumed_from is not None and isinstance(logger, AppendingCSVLogger):
                    logger.drop_rows_from(resumed_from["global_step"])
        except KeyboardInterrupt:  # Ctrl-C or kill before training: nothing worth keeping yet
            line = f"crate-train: interrupted ({stop.name}) before training; nothing was trained"
            folder.close(line, trained=False)
            print(line, file=sys.stderr)
            sys.exit(stop.exit_code)
        except Exception as err:
            explained = explain(err, cfg)  # another package's error with a known cause (wandb, no GPU)
            if explained is None and not isinstance(err, USER_ERRORS):
                raise
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            message = explained or _first_line(err)
            folder.close(f"crate-train: error: {message}", trained=False)
            raise ConfigError(message) from None

        best_validation = None
        try:
            with _ddp_launch_scope():
                try:
                    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
                    best = getattr(trainer.checkpoint_callback, "best_model_path", None)
                    if cfg.get("validate_best") and best:
                        best_validation = validate_checkpoint(trainer, module, datamodule, best)
                except SystemExit:  # Lightning's end of a KeyboardInterrupt: its shutdown, then exit(1)
                    if stop.signal is None:
                        raise
                except KeyboardInterrupt:  # one that came outside Lightning's handling
                    pass
        except (DataError, OSError, RuntimeError) as err:
            full = disk_full(err)
            if isinstance(err, DataError):  # a dataset file found broken while training
                message = _first_line(err)
            elif full is not None:
                message = (
                    f"no space left on the device while writing {full.filename or 'a file of the run'} "
                    f"({full.strerror}): the checkpoints written so far in {output_dir / 'checkpoints'} are "
                    "intact: free space, then resume with ckpt_path=last "
                    f"hydra.run.dir={pasteable(output_dir)}"
                )
            elif (explained := explain(err, cfg)) is not None:  # e.g. data.download=true, no network
                message = explained
            else:
                raise
            folder.close(f"crate-train: error: {message}", trained=trained_anything(trainer, output_dir))
            raise ConfigError(message) from None

        stopped = stop.signal is not None  # further signals are ignored while the summary is written
        checkpoint = trainer.checkpoint_callback  # the first one: the best by its monitor
        last = [c.best_model_path for c in trainer.checkpoint_callbacks if getattr(c, "monitor", 1) is None]
        wall_time = time.time() - started
        summary = {
            "status": "interrupted" if stopped else "finished",
            "metrics": _float_metrics(trainer.callback_metrics),
            "best": {
                "monitor": getattr(checkpoint, "monitor", None),
                "score": float(checkpoint.best_model_score)
                if getattr(checkpoint, "best_model_score", None) is not None
                else None,
            },
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "wall_time_s": round(wall_time, 2),
            # this run's part plus the time its checkpoint had recorded, over every resume (None when
            # the checkpoint it resumed from was written before crate-train recorded the time)
            "total_wall_time_s": round(clock.total_s(started + wall_time), 2)
            if resumed_from is None or clock.earlier_s is not None
            else None,
            "resumed_from": resumed_from,
            "checkpoints": {
                "best": getattr(checkpoint, "best_model_path", "") or None,
                "last": (last[0] if last else getattr(checkpoint, "last_model_path", "")) or None,
            },
            "best_validation": best_validation,
            "metrics_file": _metrics_file(loggers),
            "config": str(output_dir / ".hydra" / "config.yaml"),
            "output_dir": str(output_dir),
        }
        if stopped:
            summary["signal"] = stop.signal.name
        if trainer.is_global_zero:
            summary_path = output_dir / "summary.json"
            atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
            if stopped:
                line = stop_line(stop, trainer, output_dir)
                folder.log(line, logging.WARNING)
                print(line, file=sys.stderr, flush=True)
            else:
                _report(summary, summary_path)
        if stopped:
            sys.exit(stop.exit_code)
    return summary


def _report(summary: Dict[str, Any], path: Path) -> None:
    metrics = summary["metrics"]
    shown = [k for k in ("val/acc1", "val/acc5") if k in metrics]
    shown = shown or [k for k in ("val/loss",) if k in metrics]
    values = ", ".join(f"{k} {metrics[k]:.4f}" for k in shown) or "no validation metrics"
    took = f"in {summary['wall_time_s']:.1f} s"
    resumed, total = summary.get("resumed_from"), summary.get("total_wall_time_s")
    if resumed:
        step, part = resumed["global_step"], summary["wall_time_s"]
        took = (  # the time of every part, not only of the resumed one
            f"in {total:.1f} s, {part:.1f} s of them in this run (resumed at step {step})"
            if total is not None
            else f"(this run, resumed at step {step}, took {part:.1f} s)"
        )
    # paths as they paste back after key= into a shell (quoted for Hydra when they need it)
    shown_path = summary["checkpoints"]["best"] or summary["checkpoints"]["last"]
    lines = [
        f"{values} after {summary['epochs']} epochs {took}",
        f"checkpoint: {pasteable(shown_path) if shown_path else None}",
        f"metrics:    {pasteable(summary['metrics_file']) if summary['metrics_file'] else None}",
        f"config:     {pasteable(summary['config'])}",
        f"summary:    {pasteable(path)}",
    ]
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg)
    except ConfigError as err:
        print(f"crate-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    # the value Hydra sweepers (Optuna) optimise: the metric that picks the best checkpoint
    return summary["best"]["score"]


EXAMPLES = (
    "crate-train                                   # the CPU demo: crate_mini on the built-in shapes",
    "crate-train model=crate_tiny data=imagenet data.root=/data/imagenet trainer=gpu",
    "crate-train experiment=cifar_finetune model.pretrained=/ckpt/CRATE_small.pth data.root=/data/cifar",
    "crate-train -m optimizer=lion,adamw optimizer.lr=1e-4,2e-4   # a sweep, one run per combination",
    "crate-train debug=fdr                         # one batch through every step; or limit, overfit",
    "crate-train trainer.max_epochs=20 hydra.run.dir=outputs/<date>/<time> ckpt_path=last   # resume",
)


def main() -> None:
    """The ``crate-train`` command: its own ``--help``, one line for a mistyped group option or
    key, then Hydra composes the config and ``run`` trains."""
    run_command("crate-train", "train", "Train, fine-tune or pre-train a CRATE model.", EXAMPLES, _hydra_main)


if __name__ == "__main__":
    main()
