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
from typing import Any, Dict

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from .building import build_callbacks, build_datamodule, build_module, build_trainer, instantiate_group
from .configs import run_command, to_container
from .data.loading import DataError
from .launching import ddp_launch_scope
from .loggers import AppendingCSVLogger, quiet_lightning_notices
from .reporting import print_summary, run_summary
from .runs import (
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
from .validation import USER_ERRORS, ConfigError, error_line, resolve_ckpt_path, validate

log = logging.getLogger("crate_lit.train")


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
                # in place: parameter names (and checkpoints) stay unchanged
                module.model.compile(mode=cfg.get("compile_mode"))
            clock = RunClock(started)
            loggers = instantiate_group(cfg.get("logger"))
            callbacks = build_callbacks(cfg, clock, loggers)
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
            trainer = build_trainer(cfg, output_dir, callbacks, loggers)
            # the first writes into the folder, after every check: a refused resume leaves its
            # hparams.yaml and metrics.csv as they were. The loggers get the whole composed config
            # (the modules save theirs with logger=False: their keys clash, e.g. the two seeds)
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
            message = explained or error_line(err)
            folder.close(f"crate-train: error: {message}", trained=False)
            raise ConfigError(message) from None

        best_validation = None
        try:
            with ddp_launch_scope():
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
                message = error_line(err)
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
        wall_time = time.time() - started
        summary = run_summary(
            trainer,
            loggers,
            output_dir,
            wall_time_s=wall_time,
            total_wall_time_s=clock.total_s(started + wall_time)
            if resumed_from is None or clock.earlier_s is not None
            else None,
            resumed_from=resumed_from,
            best_validation=best_validation,
            signal=stop.signal.name if stopped else None,
        )
        if trainer.is_global_zero:
            summary_path = output_dir / "summary.json"
            atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
            if stopped:
                line = stop_line(stop, trainer, output_dir)
                folder.log(line, logging.WARNING)
                print(line, file=sys.stderr, flush=True)
            else:
                print_summary(summary, summary_path)
        if stopped:
            sys.exit(stop.exit_code)
    return summary


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
