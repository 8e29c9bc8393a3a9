"""The run's loggers (``lightning.loggers``): TensorBoard and CSV, both continued on resume.

Lightning's CSV logger deletes an existing ``metrics.csv`` when its folder is reused, so a
resumed run (``-r RUN``) lost the rows of the earlier steps. :class:`ResumableCSVLogger` appends
to the file instead (keeping its columns, adding new ones). TensorBoard writes one new events
file per start next to the earlier ones, so its history needs nothing.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from ldm.config import ConfigError

logger = logging.getLogger(__name__)

LOGGER_NAMES = ("tensorboard", "csv")


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing ``metrics.csv`` instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            header = next(csv.reader(f), [])
        # known columns: new rows are appended under the same header (new keys rewrite it)
        self.metrics_keys = [k for k in header if k]


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resumed run (rows are appended)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def build_loggers(light: Mapping[str, Any], run_dir: Path) -> list:
    """The loggers named in ``lightning.loggers`` (default: TensorBoard and CSV) writing into
    ``run_dir/tensorboard`` and ``run_dir/csv``."""
    names = light.get("loggers", list(LOGGER_NAMES))
    out: list[Any] = []
    for n in names:
        if n == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                logger.warning("tensorboard is not installed: TensorBoard logging is off")
                continue
            out.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
        elif n == "csv":
            out.append(ResumableCSVLogger(save_dir=str(run_dir), name="csv", version=""))
        else:
            raise ConfigError(
                f"unknown logger {n!r} in lightning.loggers; use {', '.join(LOGGER_NAMES)}"
            )
    return out
