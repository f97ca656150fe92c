"""Run folders and the files in them: each run claims a folder of its own before Hydra writes
into it, files are replaced atomically (a temporary file beside the target, then a rename), and
a checkpoint to resume from is checked against the run that resumes it."""

from __future__ import annotations

import errno
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.error
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Callable, Dict, List, Mapping, Optional

import lightning as L
import torch
from hydra.experimental.callback import Callback
from lightning.pytorch.plugins import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from .models.factory import MODEL_NAMES, named_config, read_weights_file

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


def _in_chain(err: Optional[BaseException], match: Callable[[BaseException], bool]) -> Any:
    """The first of ``err``, its cause or its context, and theirs, that ``match`` accepts."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if match(err):
            return err
        err = err.__cause__ or err.__context__
    return None


def disk_full(err: BaseException) -> Optional[OSError]:
    """The out-of-space error behind ``err`` (itself, its cause or its context), if any."""
    return _in_chain(err, lambda e: isinstance(e, OSError) and e.errno in DISK_FULL)


# ---------------------------------------------------------------------------------------------
# claiming a run folder


class RunFolderError(ValueError):
    """A run folder that a run may not use; reported as one line."""


# the fresh (timestamped) run folders this process created, each with the folders above it that
# it had to create (the date folder, ...): those go with it when the run fails at start, if empty
FRESH_FOLDERS: Dict[Path, List[Path]] = {}


def holds_run(folder: Path) -> bool:
    return any((folder / marker).exists() for marker in RUN_MARKERS)


def claim_fresh_folder(base: Path) -> Path:
    """Create ``base``, or ``base_1``, ``base_2``, ... when another run has it: ``mkdir`` is
    atomic, so of two runs started in the same second each gets a folder of its own."""
    for index in range(10_000):
        candidate = base if index == 0 else base.with_name(f"{base.name}_{index}")
        for _ in range(3):  # a run that failed at start may remove the (then empty) date folder
            created = [p for p in (base.parent, *base.parent.parents) if not p.exists()]
            base.parent.mkdir(parents=True, exist_ok=True)
            try:
                candidate.mkdir()
                FRESH_FOLDERS[candidate.resolve()] = [p.resolve() for p in created]
                return candidate
            except FileExistsError:
                break
            except FileNotFoundError:
                continue
    raise RunFolderError(f"no fresh run folder left beside {base}; set hydra.run.dir=<a new folder>")


def claim_named_folder(folder: Path, resuming: bool, key: str) -> None:
    """A folder given on the command line may hold an earlier run only when this run resumes it;
    otherwise creating its ``.hydra`` (atomic) claims it for this run alone."""
    if resuming:
        return
    refused = RunFolderError(
        f"{key}={pasteable(folder)} already holds a run (nothing was changed in it); resume it with "
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


# characters that the shell and Hydra's override lexer both take as they are
_PLAIN = re.compile(r"[A-Za-z0-9_./+:@%-]+")


def pasteable(path: os.PathLike | str) -> str:
    """``path`` as it is to be pasted after ``key=`` into a shell command line for Hydra: as it is
    when it is plain, otherwise quoted for Hydra (``_quoted``: spaces, non-ASCII, ``,``, ``=``
    ... do not get through its lexer unquoted) inside quotes for the shell, which would strip the
    Hydra quotes otherwise."""
    text = str(path)
    if _PLAIN.fullmatch(text):
        return text
    hydra = _quoted(Path(text))
    if not any(c in hydra for c in '"$`\\!'):  # nothing the shell interprets inside "..."
        return f'"{hydra}"'
    return shlex.quote(hydra)


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
            _exit_with_error(str(err))
        except OSError as err:  # read-only, not a folder (CRATE_LIT_OUTPUTS=<a file>), no permission
            where = f"{key}=<a writable folder>"
            if not _named_on_command_line(config, key):
                where = f"CRATE_LIT_OUTPUTS=<a writable folder> or {where}"
            _exit_with_error(
                f"cannot create the run folder {pasteable(OmegaConf.select(config, key))}: "
                f"{err.strerror or err} ({err.filename}); set {where}"
            )

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._guarded(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        # submitit's SLURM executor needs srun (and sbatch), and says so only in a traceback
        off_cluster = shutil.which("srun") is None and "LOCAL_RANK" not in os.environ
        if launcher.endswith("SlurmLauncher") and off_cluster:
            _exit_with_error(
                "hydra/launcher=slurm submits each job to SLURM, but this machine has no SLURM (srun is "
                "not on PATH); run the command on the cluster's login node, or leave out "
                "hydra/launcher=slurm to run the jobs here one after the other"
            )
        self._guarded(config, "hydra.sweep.dir")


def _exit_with_error(message: str) -> None:
    """The project's user error: one line on stderr, exit status 2."""
    print(f"crate-train: error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------
# checking a checkpoint to resume from


def read_checkpoint(path: os.PathLike | str, resuming: bool = True) -> Dict[str, Any]:
    """A checkpoint's contents (``read_weights_file``); one that holds objects other than tensors
    and plain containers (another project's hyper-parameters) is unpickled only to be resumed,
    as Lightning itself would: otherwise (``resuming=False``, e.g. a downloaded file to analyse)
    unpickling arbitrary objects could run code, so such a file is refused."""
    refuse = (
        "crate-train reads them only from a checkpoint it resumes: give a crate-train .ckpt or a "
        "released state dict"
    )
    label = f"ckpt_path={pasteable(path)}"
    give = "give a crate-train .ckpt, e.g. ckpt_path=last"
    checkpoint = read_weights_file(path, label, give, None if resuming else refuse)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{label} holds a {type(checkpoint).__name__}, not a checkpoint")
    return checkpoint


# what fixes the shapes of a model's weights (the rest, e.g. drop rates, may change on resume)
_SHAPE_KEYS = ("embed_dim", "depth", "num_heads", "patch_size", "decoder_depth", "in_chans")


def saved_model(checkpoint: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The model config a crate-train checkpoint was trained with (its ``hyper_parameters``)."""
    model = (checkpoint.get("hyper_parameters") or {}).get("model")
    return dict(model) if isinstance(model, Mapping) and model.get("name") else None


def model_overrides(model: Mapping[str, Any]) -> str:
    """``model=<name>`` plus the ``model.<key>=<value>`` overrides that its config needs beyond
    the named size (``named_config``: the size table over the constructor's defaults)."""
    name = str(model["name"])
    table = named_config(name) if name in MODEL_NAMES else {}
    extra = [
        f"model.{k}={model[k]}" for k in _SHAPE_KEYS if k in model and k in table and model[k] != table[k]
    ]
    return " ".join([f"model={name}", *extra])


def check_resume(
    checkpoint: Dict[str, Any],
    path: str,
    ema_decay: Optional[float],
    model: Optional[Mapping[str, Any]] = None,
    weights: Optional[Mapping[str, Any]] = None,
) -> None:
    """One-line errors for a checkpoint that this run cannot continue faithfully; ``model`` is
    this run's model config, checked against the one the checkpoint was trained with, and
    ``weights`` its module's state dict, whose names and shapes the checkpoint's must have (a
    head or position table sized by the data settings differs without the model config)."""
    if "pytorch-lightning_version" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(
            f"ckpt_path={pasteable(path)} holds model weights, not a crate-train checkpoint to resume; "
            "start from them with model.pretrained=<that file>"
        )
    saved = saved_model(checkpoint)
    if model is not None and saved is not None:
        differ = [k for k in ("name", *_SHAPE_KEYS) if k in saved and k in model and saved[k] != model[k]]
        if differ:
            ours = f"model={model['name']}" if "name" in differ else model_overrides(model)
            raise ValueError(
                f"ckpt_path={pasteable(path)} was saved from a different model, {model_overrides(saved)}, "
                f"than this run's {ours}; resume it with {model_overrides(saved)} (and the other "
                "overrides of that run)"
            )
    misfit = _weights_misfit(checkpoint["state_dict"], weights) if weights is not None else None
    if misfit is not None:
        raise ValueError(
            f"ckpt_path={pasteable(path)} does not fit this run's model ({misfit}): "
            f"{model_change(saved, model or {})}; resume with the model config it was trained with"
        )
    if "current_model_state" in checkpoint and ema_decay is None:
        states = checkpoint.get("callbacks", {}).values()
        decay = next((s["decay"] for s in states if isinstance(s, dict) and "decay" in s), None)
        value = f"ema_decay={decay}" if decay is not None else "ema_decay=<the run's decay>"
        raise ValueError(
            f"ckpt_path={pasteable(path)} was trained with an EMA of the weights; resume it with {value} "
            "(without it the averaged weights would continue as if they were the raw ones)"
        )


# ---------------------------------------------------------------------------------------------
# how long a run has trained, over resumes


class RunClock(L.Callback):
    """Keeps in each checkpoint the seconds the run had taken when the checkpoint was written
    (this part plus the parts before the checkpoint it resumed from), so that a resumed run can
    report its whole time and not only its own part."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.earlier_s: Optional[float] = None  # restored from the checkpoint of a resumed run

    def total_s(self, now: Optional[float] = None) -> float:
        return (self.earlier_s or 0.0) + (now if now is not None else time.time()) - self.started

    def state_dict(self) -> Dict[str, Any]:
        return {"elapsed_s": self.total_s()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.earlier_s = float(state_dict["elapsed_s"])


# ---------------------------------------------------------------------------------------------
# Ctrl-C and kill


class StopSignals:
    """Within ``with StopSignals() as stop:``, SIGINT (Ctrl-C) and SIGTERM (``kill``) both raise
    ``KeyboardInterrupt`` where the main thread is, and ``stop.signal`` says which came. Lightning
    answers a ``KeyboardInterrupt`` with its graceful shutdown (callbacks, loggers finalised) and
    ``sys.exit(1)``; its own SIGTERM handling only asks the loop to stop after the batch, and
    then ends the run as if it had finished (exit 0, no summary). A second signal during the
    shutdown is ignored, as Lightning does for SIGINT."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: Optional[signal.Signals] = None
        self._previous: Dict[int, Any] = {}

    @property
    def name(self) -> str:
        """The signal that came (a Ctrl-C that Python itself turned into KeyboardInterrupt: SIGINT)."""
        return (self.signal or signal.SIGINT).name

    @property
    def exit_code(self) -> int:
        """The shell's status for a process ended by the signal: 128 + its number (130, 143)."""
        return 128 + int(self.signal or signal.SIGINT)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal is not None:
            return
        self.signal = signal.Signals(signum)
        raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can be set there only
            self._previous = {s: signal.getsignal(s) for s in self.SIGNALS}
            for s in self.SIGNALS:
                signal.signal(s, self._handle)
        return self

    def __exit__(
        self, kind: Optional[type], value: Optional[BaseException], traceback: Optional[TracebackType]
    ) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------
# a run that stops: what it leaves in its folder


class RunFolder:
    """A run's folder as it was when the run began (after Hydra wrote its config and log file),
    so that a run that fails before training leaves no empty folder behind, and never removes
    one that held anything before it."""

    HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")

    def __init__(self, path: os.PathLike | str, output_subdir: Optional[str] = ".hydra") -> None:
        self.path = Path(os.path.abspath(path))  # as logging's FileHandler names its file
        # the processes Lightning starts for the other DDP ranks share the folder of the first
        self.own = "LOCAL_RANK" not in os.environ
        self.log_handler = self._log_handler()
        self.held_before = self._held_before(output_subdir)

    def _log_handler(self) -> Optional[logging.FileHandler]:
        """Hydra's job log (``<job>.log``) of this run, if it writes one into the folder."""
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == self.path:
                return handler
        return None

    def _held_before(self, output_subdir: Optional[str]) -> List[str]:
        if not self.path.is_dir():
            return []
        log_file = Path(self.log_handler.baseFilename) if self.log_handler is not None else None
        held = []
        for entry in self.path.iterdir():
            if entry == log_file and entry.stat().st_size == 0:
                continue  # Hydra opened it for this run
            if output_subdir and entry.name == output_subdir and entry.is_dir():
                held += [f"{entry.name}/{e.name}" for e in entry.iterdir() if e.name not in self.HYDRA_FILES]
                continue
            held.append(entry.name)
        return held

    def log(self, line: str, level: int = logging.ERROR) -> None:
        """Append ``line`` to the run's log file (not to the console, which has it already)."""
        if self.log_handler is None or not self.own:
            return
        record = logging.LogRecord("crate_lit.train", level, __file__, 0, line, None, None)
        try:
            self.log_handler.handle(record)
            self.log_handler.flush()
        except Exception:  # a full or read-only disk: the line is on stderr all the same
            pass

    def discard(self) -> bool:
        """Remove the folder when it held nothing before this run, which wrote nothing of value
        into it (a failed start); returns whether it did."""
        if self.held_before or not self.own or not self.path.is_dir():
            return False
        if self.log_handler is not None:
            logging.getLogger().removeHandler(self.log_handler)
            self.log_handler.close()
            self.log_handler = None
        above = FRESH_FOLDERS.get(self.path.resolve(), [])
        shutil.rmtree(self.path, ignore_errors=True)
        for folder in above:  # deepest first; one that another run uses meanwhile is not empty
            try:
                folder.rmdir()
            except OSError:
                break
        return not self.path.exists()

    def close(self, line: str, trained: bool) -> None:
        """A run that stops with ``line``: a failed start (``trained`` false) leaves no folder that
        held nothing before it; every other folder keeps its files and gets the line in its log."""
        if trained or not self.discard():
            self.log(line)


def trained_anything(trainer: Optional[L.Trainer], output_dir: Path) -> bool:
    """Whether a run wrote anything of value: a training step, or any checkpoint."""
    if trainer is not None and trainer.global_step > 0:
        return True
    folder = output_dir / "checkpoints"
    return folder.is_dir() and any(folder.iterdir())


def _task_overrides() -> List[str]:
    """The command line's overrides of this run (of this job, in a sweep)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def stop_line(stop: StopSignals, trainer: L.Trainer, output_dir: Path) -> str:
    """The one line of a run stopped by a signal: where it is and the command that resumes it
    (this run's overrides, ``ckpt_path=last`` and its folder, quoted to paste into a shell)."""
    name = stop.name
    where = f"in epoch {trainer.current_epoch} at step {trainer.global_step}"
    last = output_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return (
            f"crate-train: interrupted ({name}) {where}, before its first checkpoint; the run's logs "
            f"are in {output_dir}; run the command again to start over"
        )
    replaced = ("ckpt_path", "hydra.run.dir")
    kept = [o for o in _task_overrides() if o.split("=", 1)[0].lstrip("+~") not in replaced]
    command = ["crate-train", *(shlex.quote(o) for o in kept), "ckpt_path=last"]
    command.append(f"hydra.run.dir={pasteable(output_dir)}")
    return (
        f"crate-train: interrupted ({name}) {where}; the run is in {output_dir} (last checkpoint: "
        f"{last.name}); resume it with: {' '.join(command)}"
    )


def _weights_misfit(saved: Mapping[str, Any], current: Mapping[str, Any]) -> Optional[str]:
    """The first difference in names or shapes between two state dicts, in words, or None."""
    for key, value in current.items():
        if key not in saved:
            return f"it has no {key}"
        if tuple(saved[key].shape) != tuple(value.shape):
            return f"{key} is {tuple(saved[key].shape)} there, {tuple(value.shape)} here"
    extra = next((key for key in saved if key not in current), None)
    return f"it has {extra}, which this model has not" if extra is not None else None


def model_change(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any]) -> str:
    """How the model config a checkpoint was trained with differs from this run's, in overrides."""
    if saved is None:
        return "it was saved from another model"
    differ = [k for k in saved if k != "pretrained" and k in current and saved[k] != current[k]]
    if not differ:
        return f"it was trained as {model_overrides(saved)}"
    theirs = " ".join(f"model.{k}={saved[k]}" for k in differ)
    ours = " ".join(f"model.{k}={current[k]}" for k in differ)
    return f"it was trained with {theirs} (this run: {ours})"


# ---------------------------------------------------------------------------------------------
# errors from outside crate-lit that have a known cause


# what urllib (torchvision's downloads) raises without a network: no DNS, refused, timed out
_NETWORK_ERRORS = (urllib.error.URLError, socket.gaierror, ConnectionError, socket.timeout)


def _chosen(group: str, fallback: str) -> str:
    """How the command line chose a config group: its option (``trainer=ddp``) when Hydra composed
    the config, else ``fallback``."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return f"{group}={choice}"
    return fallback


def _is_wandb_usage_error(err: BaseException) -> bool:
    return type(err).__module__.startswith("wandb") and type(err).__name__ == "UsageError"


def explain(err: BaseException, cfg: DictConfig) -> Optional[str]:
    """One line (what is wrong; how to fix it) for errors that other packages raise with a
    traceback or with words that do not say what to do; None for the others."""
    from .validation import error_line  # not at the top: validation imports data, which imports runs

    # wandb.errors.UsageError, named without importing wandb (an optional dependency)
    wandb = _in_chain(err, _is_wandb_usage_error)
    if wandb is not None:
        return (
            f"logger=wandb could not start a wandb run ({error_line(wandb)}); log without an account with "
            "WANDB_MODE=offline crate-train logger=wandb ... (`wandb sync` uploads it later), or run "
            "`wandb login` first"
        )
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default=""))
    # Lightning's words for it: "No supported gpu backend found!", "CUDAAccelerator can not run ..."
    said = str(err).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available() and ("gpu" in said or "cuda" in said):
        strategy = str(OmegaConf.select(cfg, "trainer.strategy", default=""))
        fix = "use trainer=ddp_sim for DDP over CPU processes" if "ddp" in strategy else "use trainer=cpu"
        trainer = _chosen("trainer", f"trainer.accelerator={accelerator}")
        return f"{trainer} needs a GPU and this machine has none ({error_line(err)}); {fix}"
    network = _in_chain(err, lambda e: isinstance(e, _NETWORK_ERRORS))
    if network is not None and OmegaConf.select(cfg, "data.download", default=False):
        reason = getattr(network, "reason", network)
        root = OmegaConf.select(cfg, "data.root", default="<data.root>")
        return (
            f"data.download=true could not download {_chosen('data', f'data={cfg.data.name}')} ({reason}); "
            "without internet here, download it elsewhere and put the extracted files under "
            f"data.root={pasteable(root)}, then leave out data.download"
        )
    return None
