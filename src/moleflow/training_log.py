"""Training curves a person can watch: one record per epoch of every product learned.

A record holds ``task``, ``epoch`` (from 1), ``loss`` and its parts (``nll``, ``tail``, ``logdet_penalty``,
``whitening_reg``; absent when the config switches a part off), the learning rate ``lr``, the epoch's
``seconds`` and, when the product trained with held-out normals (``train.early_stopping``), their mean
patch NLL ``val_nll``. Loggers (``moleflow learn/train --logger csv|tensorboard|mlflow``, repeatable):

- ``csv``: ``RUN_DIR/logs/training.csv``, one row per record, appended (the default);
- ``tensorboard``: ``RUN_DIR/logs/tensorboard`` (``tensorboard --logdir RUN_DIR/logs``), scalars
  ``<task>/<part>`` by epoch; the ``[tensorboard]`` extra;
- ``mlflow``: an MLflow run per command (tracking URI from ``MLFLOW_TRACKING_URI``, else ``RUN_DIR/logs/mlruns``),
  metrics ``<task>.<part>`` by epoch; the ``[mlflow]`` extra.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "LOGGERS",
    "CSVLogger",
    "MLflowLogger",
    "TensorBoardLogger",
    "TrainingLogger",
    "build_loggers",
    "training_loggers",
]

FIELDS = ("task", "epoch", "loss", "nll", "tail", "logdet_penalty", "whitening_reg", "lr", "seconds", "val_nll")


class TrainingLogger(Protocol):
    def log_epoch(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class CSVLogger:
    """Appends records to ``path`` (opened at the first record; header written when the file is new);
    flushed after every row."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file = None
        self._writer: csv.DictWriter | None = None

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists() or self.path.stat().st_size == 0
            fields = FIELDS if new else _header(self.path)  # a file from an older moleflow keeps its columns
            self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed by close()
            self._writer = csv.DictWriter(self._file, fieldnames=fields, extrasaction="ignore")
            if new:
                self._writer.writeheader()
        self._writer.writerow(dict(record))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), None) or list(FIELDS)


class TensorBoardLogger:
    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        from moleflow.extras import require_extra

        require_extra("tensorboard", "--logger tensorboard")
        self.log_dir = Path(log_dir)
        self._writer = None

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        for key, value in record.items():
            if key not in ("task", "epoch") and value is not None:
                self._writer.add_scalar(f"{record['task']}/{key}", float(value), int(record["epoch"]))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class MLflowLogger:
    def __init__(self, tracking_dir: str | os.PathLike[str], run_name: str) -> None:
        from moleflow.extras import require_extra

        require_extra("mlflow", "--logger mlflow")
        import mlflow

        self._mlflow, self.tracking_dir, self.run_name, self._run = mlflow, Path(tracking_dir), run_name, None

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        if self._run is None:
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                self._mlflow.set_tracking_uri(self.tracking_dir.resolve().as_uri())
            self._run = self._mlflow.start_run(run_name=self.run_name)
        metrics = {
            f"{record['task']}.{k}": float(v) for k, v in record.items() if k not in ("task", "epoch") and v is not None
        }
        self._mlflow.log_metrics(metrics, step=int(record["epoch"]))

    def close(self) -> None:
        if self._run is not None:
            self._mlflow.end_run()


LOGGERS = ("csv", "tensorboard", "mlflow")


@contextlib.contextmanager
def training_loggers(names: Sequence[str] | None, run_dir: str | os.PathLike[str]) -> Iterator[list[TrainingLogger]]:
    """:func:`build_loggers` (``csv`` when ``names`` is empty), closed when the block ends."""
    loggers = build_loggers(names or ["csv"], run_dir)
    try:
        yield loggers
    finally:
        for logger in loggers:
            logger.close()


def build_loggers(names: Sequence[str], run_dir: str | os.PathLike[str]) -> list[TrainingLogger]:
    """The loggers ``names`` writing under ``RUN_DIR/logs``."""
    logs = Path(run_dir) / "logs"
    unknown = sorted(set(names) - set(LOGGERS))
    if unknown:
        raise ValueError(f"unknown logger(s) {unknown}; choose from {list(LOGGERS)}")
    out: list[TrainingLogger] = []
    for name in dict.fromkeys(names):
        if name == "csv":
            out.append(CSVLogger(logs / "training.csv"))
        elif name == "tensorboard":
            out.append(TensorBoardLogger(logs / "tensorboard"))
        else:
            out.append(MLflowLogger(logs / "mlruns", run_name=Path(run_dir).name))
    return out
