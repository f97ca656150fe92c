"""A CSV logger that keeps what an earlier run of the same folder wrote, with its columns in
natural order; and the two notices Lightning prints on every run, silenced."""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import warnings
from argparse import Namespace
from typing import Any, Dict, List, Union

import torch
import yaml
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from .runs import atomic_write_text


def natural_key(name: str) -> List[Union[int, str]]:
    """Sort key that orders the numbers inside names by value: ``whitebox/sparsity_l2`` before
    ``whitebox/sparsity_l10`` (a plain string sort puts l10 and l11 between l1 and l2)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class AppendingCSVLogger(Logger):
    """``metrics.csv`` and ``hparams.yaml`` in ``save_dir/name/version`` (the run folder, as
    Lightning's ``CSVLogger`` lays them out), except that rows already in ``metrics.csv`` are
    kept: a resumed run appends its own after them, once ``drop_rows_from`` has removed the rows
    of the steps it trains again. Columns are in natural order, and a header change rewrites the
    file atomically, so a full disk at that moment loses no row.

    Written on Lightning's public ``Logger`` rather than by subclassing ``CSVLogger``: keeping
    the earlier rows means replacing what its writer does when it opens the folder (it deletes
    ``metrics.csv``), and those are private methods."""

    METRICS_FILE = "metrics.csv"
    HPARAMS_FILE = "hparams.yaml"

    def __init__(self, save_dir: os.PathLike | str, name: str = "", version: str = "") -> None:
        super().__init__()
        self._save_dir = os.fspath(save_dir)
        self._name, self._version = str(name or ""), str(version or "")
        self._hparams: Dict[str, Any] = {}
        self._rows: List[Dict[str, Any]] = []
        self._header: List[str] | None = None  # read from the file when first needed

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return os.path.join(self._save_dir, self._name, self._version)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.log_dir, self.METRICS_FILE)

    @rank_zero_only
    def log_hyperparams(self, params: Dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        self._hparams.update(vars(params) if isinstance(params, Namespace) else params)
        text = yaml.safe_dump(self._hparams, sort_keys=True)
        atomic_write_text(os.path.join(_made(self.log_dir), self.HPARAMS_FILE), text)

    @rank_zero_only
    def log_metrics(self, metrics: Dict[str, Any], step: int | None = None) -> None:
        row = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        row["step"] = len(self._rows) if step is None else step
        self._rows.append(row)

    @rank_zero_only
    def save(self) -> None:
        """Append the rows logged since the last save; under a header with new columns (or one
        not in natural order: a file of an earlier run this one resumes), rewrite the file."""
        if not self._rows:
            return
        path = self.metrics_path
        if self._header is None:
            self._header = _read_header(path)
        header = sorted(set(self._header).union(*self._rows), key=natural_key)
        if header != self._header or not os.path.isfile(path):
            old = _read_rows(path)
            text = io.StringIO(newline="")
            writer = csv.DictWriter(text, fieldnames=header)
            writer.writeheader()
            writer.writerows(old + self._rows)
            atomic_write_text(os.path.join(_made(self.log_dir), self.METRICS_FILE), text.getvalue())
        else:
            with open(path, "a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=header).writerows(self._rows)
        self._header, self._rows = header, []

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()

    @rank_zero_only
    def drop_rows_from(self, step: int) -> None:
        """Remove the rows logged at ``step`` or later: a run resumed from a checkpoint taken at
        global step ``step`` logs them again. (Every row belongs to the step it was logged at:
        training rows to the step they precede, epoch-end and validation rows, the white-box
        monitor's included, to the epoch's last step.)"""
        path = self.metrics_path
        rows = _read_rows(path)
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < step]
        if len(kept) == len(rows):
            return
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=_read_header(path))
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(path, text.getvalue())


def _made(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    return folder


def _read_header(path: str) -> List[str]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as handle:
        return next(csv.reader(handle), [])


def _read_rows(path: str) -> List[Dict[str, str]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# the advert Lightning logs whenever a Trainer is built without its own cloud logger
_LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LITLOGGER_TIP)


def quiet_lightning_notices() -> None:
    """Silence the two notices every run printed that say nothing about the run: Lightning's
    litlogger advert (one message of its rank-zero logger; its other messages stay) and torch's
    ``LeafSpec`` deprecation warning raised from Lightning's own pytree code (other warnings
    stay). Safe to call more than once."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLitLoggerTip) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLitLoggerTip())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
