"""A CSV logger that keeps what an earlier run of the same folder wrote."""

from __future__ import annotations

import csv
import io
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from .runs import atomic_write_text


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here; a resumed run (ckpt_path=last in the same
        # folder) appends to it instead, under the header it already has
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])


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
