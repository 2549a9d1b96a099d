"""The continual benchmark protocol (DESIGN.md): learn the tasks in order; after each one, evaluate every
task learned so far (routed: task id not given; oracle: task id given). Built on a
:class:`~moleflow.session.RunSession`, i.e. on the same :class:`~moleflow.detector.Detector` and run
directory code as ``moleflow learn``: each task is committed to the run as soon as it is learned.

A run directory that is not empty is refused unless ``overwrite`` (its moleflow files are removed first)
or ``resume`` (the tasks it already holds, which must be the first of the list, are kept and the rest are
learned).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moleflow.config import MoleFlowConfig, dump_yaml
from moleflow.data.base import TaskData
from moleflow.detector import Detector, DetectorError
from moleflow.evaluation.evaluate import METRICS, EvalSet, prepare_eval_set
from moleflow.rundir import RunDirectory, RunDirectoryError
from moleflow.session import RunSession
from moleflow.validation import validate_tasks

__all__ = ["METRICS", "ContinualExperiment"]

log = logging.getLogger(__name__)


class ContinualExperiment:
    """``ContinualExperiment(cfg, run_dir).run(tasks)`` -> results.json (see the module docstring)."""

    def __init__(
        self,
        cfg: MoleFlowConfig,
        run_dir: str | os.PathLike[str],
        *,
        progress: bool = True,
        num_workers: int = 0,
        feature_cache: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        resume: bool = False,
        loggers=(),
    ) -> None:
        options = {"progress": progress, "num_workers": num_workers, "feature_cache": feature_cache, "loggers": loggers}
        run = RunDirectory(run_dir)
        if resume and run.is_run():
            detector = Detector.load(run.path, **options)
            if dump_yaml(detector.cfg) != dump_yaml(cfg):
                raise RunDirectoryError(
                    f"--resume: {run.config_path} differs from the config given; resume with the run's own config "
                    f"(moleflow train {run.config_path} ...) or start a new run"
                )
        else:
            if overwrite:
                clear_run(run)
            elif not run.is_empty():
                raise RunDirectoryError(
                    f"{run.path} is not empty; pass --overwrite to replace the run there, --resume to continue it, "
                    "or choose a new directory (to add products to a run, use `moleflow learn`)"
                )
            detector = Detector.create(cfg, run.path, **options)
        self.session = RunSession(detector)

    @classmethod
    def open(cls, run_dir: str | os.PathLike[str], **options: Any) -> ContinualExperiment:
        """The experiment of an existing run (to evaluate or analyse it)."""
        self = cls.__new__(cls)
        self.session = RunSession(Detector.load(run_dir, **options))
        return self

    # ------------------------------------------------------------------ what analyses and benchmarks use

    @property
    def detector(self) -> Detector:
        return self.session.detector

    @property
    def cfg(self) -> MoleFlowConfig:
        return self.detector.cfg

    @property
    def model(self):
        return self.detector.model

    @property
    def router(self):
        return self.detector.router

    @property
    def device(self):
        return self.detector.device

    @property
    def run_dir(self) -> Path:
        return self.session.run_dir

    @property
    def eval_size(self) -> int:
        return self.cfg.model.backbone.image_size

    @property
    def eval_sets(self) -> dict[str, EvalSet]:
        return self.session.eval_sets

    @property
    def thresholds(self) -> dict[str, float]:
        return {name: rec.calibration.image_threshold for name, rec in self.detector.records.items()}

    @property
    def trainer(self):
        """A trainer on the detector's model and router (for analyses that train outside the protocol)."""
        from moleflow.training import ContinualTrainer

        return ContinualTrainer(self.model, self.router, self.cfg, self.device)

    def extract(self, samples, desc: str = "features"):
        return self.detector.features(samples, desc)

    def prepare_eval_set(self, task: TaskData) -> EvalSet:
        return prepare_eval_set(self.detector, task)

    # ------------------------------------------------------------------ the protocol

    def run(
        self,
        tasks: Sequence[TaskData],
        specs: Sequence[str | None] | None = None,
        limits: tuple[int, int] | None = None,
        data_root: str | None = None,
    ) -> dict[str, Any]:
        """Learn and evaluate ``tasks`` in order; returns results.json. ``specs`` (how the tasks were
        given) are recorded so that ``moleflow eval`` can rebuild the test sets; ``limits`` and
        ``data_root`` are recorded with them."""
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        done = self.detector.products
        if names[: len(done)] != done:
            raise DetectorError(f"--resume: the run holds {done}, which is not the start of the task list {names}")
        if data_root is not None:
            self.detector.data_root = str(Path(data_root).resolve())
        specs = list(specs) if specs is not None else [None] * len(tasks)
        validate_tasks(tasks[len(done) :])  # every image of every task, before the first is learned
        for task in tasks[: len(done)]:
            self.session.eval_sets.setdefault(task.name, prepare_eval_set(self.detector, task))
        for task, spec in list(zip(tasks, specs, strict=True))[len(done) :]:
            log.info(
                "task %d of %d: %r (%d train / %d test images)",
                len(self.detector) + 1,
                len(tasks),
                task.name,
                len(task.train),
                len(task.test),
            )
            self.session.learn(task, task.name, evaluate="all", spec=spec, limits=limits, check=False)
        return self.session.last_results or self.session.write()


def clear_run(run: RunDirectory) -> None:
    """Remove the files moleflow writes in a run directory; refuse if it holds anything else."""
    import shutil

    if run.is_empty():
        return
    if not run.path.is_dir():
        raise RunDirectoryError(f"{run.path} is a file, not a directory")
    ours = {
        "config.yaml",
        "tasks.json",
        "results.json",
        "report.md",
        "train.log",
        ".lock",
        "checkpoints",
        "figures",
        "predictions",
    }
    foreign = sorted(p.name for p in run.path.iterdir() if p.name not in ours and not p.name.endswith(".tmp"))
    if foreign:
        raise RunDirectoryError(
            f"--overwrite: {run.path} holds files moleflow did not write ({foreign[:5]}); they are not deleted: "
            "choose another directory"
        )
    with run.writing():
        for p in run.path.iterdir():
            if p.name == ".lock":
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
