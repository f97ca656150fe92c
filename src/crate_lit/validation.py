"""Config values checked before anything is built: each mistake a user can make in one is one
line (``ConfigError``) that says what is wrong and how to fix it."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .callbacks import check_ema_decay
from .data import DATAMODULES
from .flops import check_peak_tflops
from .modules import TASKS, is_mae
from .optim import DECAY_RULES, OPTIMIZERS, SCHEDULES

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


def require_int(cfg: DictConfig, key: str, minimum: int = 1) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def per_device_batch_size(cfg: DictConfig) -> int:
    """``data.batch_size`` is global: split it over devices x nodes x gradient accumulation."""
    batch = require_int(cfg, "data.batch_size")
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
        require_int(cfg, key)
    lr = OmegaConf.select(cfg, "optimizer.lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"optimizer.lr must be a positive number, got {lr!r}")
    for group, names in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULES)):
        if OmegaConf.select(cfg, f"{group}.name") not in names:
            raise ConfigError(
                f"unknown {group}.name {OmegaConf.select(cfg, f'{group}.name')!r}; "
                f"choose one of {', '.join(names)}"
            )
    decayed = OmegaConf.select(cfg, "optimizer.decayed")
    layer_decay = OmegaConf.select(cfg, "optimizer.layer_decay")
    if decayed is not None and decayed not in DECAY_RULES:
        raise ConfigError(f"unknown optimizer.decayed {decayed!r}; choose one of {', '.join(DECAY_RULES)}")
    if layer_decay is not None and not (
        isinstance(layer_decay, (int, float)) and not isinstance(layer_decay, bool) and 0 < layer_decay <= 1
    ):
        raise ConfigError(
            f"optimizer.layer_decay must be null or a number in (0, 1] (e.g. 0.65), got {layer_decay!r}"
        )
    if cfg.data.name not in DATAMODULES:
        raise ConfigError(f"unknown data.name {cfg.data.name!r}; choose one of {', '.join(DATAMODULES)}")
    task, model = cfg.get("task"), str(OmegaConf.select(cfg, "model.name"))
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if cfg.get("ema_decay") is not None:  # the callbacks group's ema entry takes it
        check_ema_decay(cfg.ema_decay)
    # what torch.compile and torch.set_float32_matmul_precision take; they refuse others with a traceback
    compile_modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if cfg.get("compile_mode") is not None and cfg.compile_mode not in compile_modes:
        raise ConfigError(
            f"unknown compile_mode {cfg.compile_mode!r}; choose null or one of {', '.join(compile_modes)}"
        )
    matmul = cfg.get("float32_matmul_precision", "high")
    if matmul not in ("highest", "high", "medium"):
        raise ConfigError(
            f"unknown float32_matmul_precision {matmul!r}; choose highest (exact float32), high (TF32 "
            "tensor cores) or medium"
        )
    check_peak_tflops(OmegaConf.select(cfg, "callbacks.throughput.peak_tflops"))
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
    # mixup block: finite alphas >= 0 and probabilities (NaN fails every comparison); mixing
    # needs labels, which task=mae has not
    mixing = OmegaConf.select(cfg, "mixup", default=None) or {}
    for key, value in mixing.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in ("mixup_alpha", "cutmix_alpha") and not (number and 0 <= value < float("inf")):
            raise ConfigError(
                f"mixup.{key} must be a number >= 0 (the alpha of its Beta(alpha, alpha); 0 turns it "
                f"off), got {value!r}"
            )
        if key in ("prob", "switch_prob") and not (number and 0 <= value <= 1):
            raise ConfigError(f"mixup.{key} is a probability in [0, 1], got {value!r}")
        if key not in ("mixup_alpha", "cutmix_alpha", "prob", "switch_prob"):
            raise ConfigError(
                f"unknown key mixup.{key}; the mixup block has mixup_alpha, cutmix_alpha, prob, switch_prob"
            )
    if task == "mae" and (mixing.get("mixup_alpha", 0) > 0 or mixing.get("cutmix_alpha", 0) > 0):
        raise ConfigError(
            "mixup/cutmix mixes the labels of classification, and task=mae has none; "
            "set mixup.mixup_alpha=0 mixup.cutmix_alpha=0 for pre-training"
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


def error_line(err: BaseException) -> str:
    """The line of ``err`` that tells a user what went wrong."""
    text = str(err).strip()
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    if isinstance(err, hydra.errors.InstantiationException) and err.__cause__ is not None:
        text = f"{text.splitlines()[0]} {error_line(err.__cause__)}"
    if text.startswith("Caught ") and "Original Traceback" in text:
        # re-raised from a DataLoader worker: the original message is the traceback's last line
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(err).__name__


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
    # whether it is a readable checkpoint, and one for this run, is runs.read_checkpoint's to say
    return str(path)
