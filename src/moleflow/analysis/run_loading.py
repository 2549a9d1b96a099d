"""Open a trained run directory for an analysis: its detector (model, router, calibration), and the same
(subsampled) tasks its products were learned from, rebuilt from the run's records as ``moleflow eval`` does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moleflow.config import MoleFlowConfig
from moleflow.data.base import TaskData


@dataclass
class LoadedRun:
    cfg: MoleFlowConfig
    experiment: Any  # moleflow.experiment.ContinualExperiment opened on the run
    tasks: list[TaskData]  # in learning order, subsampled with the run's recorded limits


def load_run(run_dir: Path, feature_cache: Path | None = None, data_root: str | None = None) -> LoadedRun:
    """Rebuild a run for analysis; clear errors when the directory is not a complete run."""
    from moleflow.experiment import ContinualExperiment
    from moleflow.sources import resolve_source

    exp = ContinualExperiment.open(run_dir, progress=False, feature_cache=feature_cache)
    detector = exp.detector
    if data_root is not None:
        detector.data_root = str(Path(data_root).resolve())
    tasks = []
    for record in detector.tasks():
        if record.spec is None and record.location is None:
            raise ValueError(
                f"product {record.name!r} of {run_dir} records no source (learned from Python?); cannot rebuild its data"
            )
        resolved = resolve_source(
            record.name, None, detector.data_root, record.limits, Path(run_dir), record.spec, record.location
        )
        tasks.append(resolved.task)
    return LoadedRun(detector.cfg, exp, tasks)
