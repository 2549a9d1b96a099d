"""Open a trained run directory for an analysis: model and router from ``checkpoints/``, the config from
``config.yaml``, and the same (subsampled) tasks from ``tasks.json``, exactly as ``moleflow eval`` does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moleflow.config import MoleFlowConfig
from moleflow.data.base import TaskData


@dataclass
class LoadedRun:
    cfg: MoleFlowConfig
    experiment: Any  # moleflow.experiment.ContinualExperiment holding the loaded model and router
    tasks: list[TaskData]  # in learning order, subsampled with the run's recorded limits


def load_run(run_dir: Path, feature_cache: Path | None = None, data_root: str | None = None) -> LoadedRun:
    """Rebuild a run for analysis; clear errors when the directory is not a complete run."""
    from moleflow.checkpoint import load_all, load_thresholds
    from moleflow.config import load_config
    from moleflow.data import resolve_tasks
    from moleflow.experiment import ContinualExperiment

    run_dir = Path(run_dir)
    for needed in ("config.yaml", "tasks.json", "checkpoints"):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(
                f"{run_dir} is not a run directory: {needed} is missing (make one with `moleflow train ... --out DIR`)"
            )
    # as cli._load_run, but the experiment below builds the one backbone we need
    cfg = load_config(run_dir / "config.yaml")
    model, router = load_all(cfg, run_dir / "checkpoints")
    thresholds = load_thresholds(cfg, run_dir / "checkpoints", router.tasks)
    recorded = json.loads((run_dir / "tasks.json").read_text())
    specs = {t["name"]: t["spec"] for t in recorded["tasks"]}
    if None in specs.values():
        raise ValueError(f"{run_dir / 'tasks.json'} records no task specs (run made from Python?); cannot rebuild the data")
    limits = tuple(recorded["limits"]) if recorded.get("limits") else None
    tasks = resolve_tasks(list(specs.values()), data_root or recorded.get("data_root"), limits)
    by_name = {t.name: t for t in tasks}
    missing = [name for name in router.tasks if name not in by_name]
    if missing:
        raise ValueError(f"tasks {missing} of the checkpoints are not in {run_dir / 'tasks.json'}")
    exp = ContinualExperiment(cfg, run_dir, progress=False, feature_cache=feature_cache)
    exp.model, exp.router, exp.thresholds = model.to(exp.device), router, thresholds
    exp.trainer.model, exp.trainer.router = exp.model, router
    return LoadedRun(cfg, exp, [by_name[name] for name in router.tasks])
