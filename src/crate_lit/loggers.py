"""A CSV logger that keeps what an earlier run of the same folder wrote, with its columns in
natural order; and the two notices Lightning prints on every run, silenced."""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import warnings
from typing import List, Set, Union

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from .runs import atomic_write_text


def natural_key(name: str) -> List[Union[int, str]]:
    """Sort key that orders the numbers inside names by value: ``whitebox/sparsity_l2`` before
    ``whitebox/sparsity_l10`` (a plain string sort puts l10 and l11 between l1 and l2)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here; a resumed run (ckpt_path=last in the same
        # folder) appends to it instead, under the header it already has
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])

    def _record_new_keys(self) -> Set[str]:
        """Lightning's, in natural order. ``save`` rewrites the file under the new header only when
        this returns keys, so a header in another order (a file of an earlier, string-sorted run
        that this one resumes) is reported as changed too: rows follow the new order."""
        before = list(self.metrics_keys)
        new_keys = set().union(*self.metrics) - set(before)
        self.metrics_keys = sorted(set(before) | new_keys, key=natural_key)
        if self.metrics_keys != before and not new_keys:
            return set(self.metrics_keys)
        return new_keys

    def _rewrite_with_new_header(self, fieldnames: List[str]) -> None:
        # Lightning's rewrites metrics.csv in place: one moment of a full disk would lose every row
        with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
            rows = list(csv.DictReader(handle))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.metrics_file_path, text.getvalue())


class AppendingCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` (``metrics.csv`` and ``hparams.yaml`` in the run folder), except
    that rows already in ``metrics.csv`` are kept: a resumed run appends its own after them, once
    ``drop_rows_from`` has removed the rows of the steps it trains again."""

    @rank_zero_only
    def drop_rows_from(self, step: int) -> None:
        """Remove the rows logged at ``step`` or later: a run resumed from a checkpoint taken at
        global step ``step`` logs them again. (Every row belongs to the step it was logged at:
        training rows to the step they precede, epoch-end and validation rows, the white-box
        monitor's included, to the epoch's last step.)"""
        path = os.path.join(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        if not os.path.isfile(path):
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            fields, rows = reader.fieldnames or [], list(reader)
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < step]
        if len(kept) == len(rows):
            return
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(path, text.getvalue())

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


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
