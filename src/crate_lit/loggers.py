"""A CSV logger that keeps what an earlier run of the same folder wrote."""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here; a resumed run (ckpt_path=last in the same
        # folder) appends to it instead, under the header it already has
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])


class AppendingCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` (``metrics.csv`` and ``hparams.yaml`` in the run folder), except
    that rows already in ``metrics.csv`` are kept: a resumed run appends its own after them (rows
    the interrupted run logged after its last checkpoint stay too, so steps may repeat)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
