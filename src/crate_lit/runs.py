"""Run folders and the files in them: each run claims a folder of its own before Hydra writes
into it, files are replaced atomically (a temporary file beside the target, then a rename), and
a checkpoint to resume from is checked against the run that resumes it."""

from __future__ import annotations

import errno
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from hydra.experimental.callback import Callback
from lightning.pytorch.plugins import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

# files and folders that show a folder already holds a crate-train run
RUN_MARKERS = (".hydra", "checkpoints", "metrics.csv", "summary.json", "multirun.yaml")
# errors that mean the disk (or the user's quota, or a file-size limit) is full
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def config_dir() -> str:
    """The packaged ``conf/`` (inside the wheel) or, in a source checkout, the top-level one."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")


def atomic_write(path: os.PathLike | str, write: Callable[[Any], None]) -> Path:
    """``write(handle)`` into a temporary file beside ``path``, then rename it over ``path``: a
    reader sees the old file or the new one, never half of one, and a full disk leaves the old
    file as it was. (A temporary file elsewhere, e.g. fsspec's, would be copied across
    filesystems by the final move, which is not atomic.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        temporary.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:  # say which file could not be written
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    return path


def atomic_write_text(path: os.PathLike | str, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode()))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with local files written by ``atomic_write``; remote
    paths (``s3://`` ...) keep Lightning's own writer."""

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: os.PathLike | str, storage_options: Optional[Any] = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))


def disk_full(err: BaseException) -> Optional[OSError]:
    """The out-of-space error behind ``err`` (itself, its cause or its context), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return err
        err = err.__cause__ or err.__context__
    return None


# ---------------------------------------------------------------------------------------------
# claiming a run folder


class RunFolderError(ValueError):
    """A run folder that a run may not use; reported as one line."""


def holds_run(folder: Path) -> bool:
    return any((folder / marker).exists() for marker in RUN_MARKERS)


def claim_fresh_folder(base: Path) -> Path:
    """Create ``base``, or ``base_1``, ``base_2``, ... when another run has it: ``mkdir`` is
    atomic, so of two runs started in the same second each gets a folder of its own."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for index in range(10_000):
        candidate = base if index == 0 else base.with_name(f"{base.name}_{index}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RunFolderError(f"no fresh run folder left beside {base}; set hydra.run.dir=<a new folder>")


def claim_named_folder(folder: Path, resuming: bool, key: str) -> None:
    """A folder given on the command line may hold an earlier run only when this run resumes it;
    otherwise creating its ``.hydra`` (atomic) claims it for this run alone."""
    if resuming:
        return
    refused = RunFolderError(
        f"{key}={folder} already holds a run (nothing was changed in it); resume it with "
        f"ckpt_path=last, or give {key} a new folder (or leave it out for a fresh one)"
    )
    if holds_run(folder):
        raise refused
    folder.mkdir(parents=True, exist_ok=True)
    if key == "hydra.run.dir":
        try:
            (folder / ".hydra").mkdir()
        except FileExistsError:  # another run claimed it a moment ago
            raise refused from None


def keep_earlier_configs(subdir: Path) -> None:
    """Before a resumed run writes its config into ``subdir`` (``.hydra``), move the earlier
    run's files to ``subdir/before-resume-<k>/``: the config a checkpoint was trained under stays."""
    files = [subdir / name for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    if not any(f.is_file() for f in files):
        return
    index = 1
    while (subdir / f"before-resume-{index}").exists():
        index += 1
    kept = subdir / f"before-resume-{index}"
    kept.mkdir()
    for f in files:
        if f.is_file():
            os.replace(f, kept / f.name)


def _named_on_command_line(config: DictConfig, key: str) -> bool:
    return any(str(o).split("=", 1)[0].lstrip("+~") == key for o in config.hydra.overrides.hydra)


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


class ClaimRunFolder(Callback):
    """Hydra callback (``hydra.callbacks`` in train.yaml): before Hydra writes the run's config,
    claim its folder. A generated (timestamped) folder that another run already has becomes a
    fresh ``<name>_1``; a folder named with ``hydra.run.dir`` / ``hydra.sweep.dir`` that holds a
    run is refused unless ``ckpt_path`` resumes it. The processes Lightning starts for the other
    DDP ranks (``LOCAL_RANK`` set) join the folder of the process that started them."""

    def _claim(self, config: DictConfig, key: str) -> Path:
        folder = Path(str(OmegaConf.select(config, key)))
        if _named_on_command_line(config, key):
            resuming = config.get("ckpt_path") is not None
            claim_named_folder(folder, resuming, key)
            if resuming and key == "hydra.run.dir" and config.hydra.output_subdir:
                keep_earlier_configs(folder / str(config.hydra.output_subdir))
            return folder
        claimed = claim_fresh_folder(folder)
        with read_write(config), open_dict(config):
            OmegaConf.update(config, key, str(claimed))
            # the jobs of a sweep are composed again from the overrides: carry the claimed folder
            config.hydra.overrides.hydra.append(f"{key}={_quoted(claimed)}")
        return claimed

    def _guarded(self, config: DictConfig, key: str) -> None:
        if "LOCAL_RANK" in os.environ:
            return
        try:
            self._claim(config, key)
        except RunFolderError as err:
            print(f"crate-train: error: {err}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._guarded(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._guarded(config, "hydra.sweep.dir")


# ---------------------------------------------------------------------------------------------
# checking a checkpoint to resume from


def read_checkpoint(path: os.PathLike | str) -> Dict[str, Any]:
    """A checkpoint's contents, memory-mapped (nothing is read that is not used). Plain
    containers are read under ``weights_only``; a checkpoint that holds other objects (another
    project's hyper-parameters) is read as Lightning itself would read it to resume."""
    try:
        try:
            checkpoint = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError:
            checkpoint = torch.load(str(path), map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # a damaged file fails in many ways (zip, pickle, unicode, storage)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"ckpt_path={path} cannot be read as a checkpoint ({first}); is it damaged?"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"ckpt_path={path} holds a {type(checkpoint).__name__}, not a checkpoint")
    return checkpoint


def check_resume(checkpoint: Dict[str, Any], path: str, ema_decay: Optional[float]) -> None:
    """One-line errors for a checkpoint that this run cannot continue faithfully."""
    if "pytorch-lightning_version" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(
            f"ckpt_path={path} holds model weights, not a crate-train checkpoint to resume; "
            "start from them with model.pretrained=<that file>"
        )
    if "current_model_state" in checkpoint and ema_decay is None:
        states = checkpoint.get("callbacks", {}).values()
        decay = next((s["decay"] for s in states if isinstance(s, dict) and "decay" in s), None)
        value = f"ema_decay={decay}" if decay is not None else "ema_decay=<the run's decay>"
        raise ValueError(
            f"ckpt_path={path} was trained with an EMA of the weights; resume it with {value} "
            "(without it the averaged weights would continue as if they were the raw ones)"
        )
