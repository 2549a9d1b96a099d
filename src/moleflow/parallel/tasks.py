"""What runs inside a Ray task: one product learned, or one product's test set evaluated, by a detector
rebuilt from the state the driver shipped (:mod:`moleflow.portable`). Plain functions: the Ray layer
(:mod:`moleflow.parallel.ray_backend`) wraps them, and a test can call them in-process."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from moleflow.data.base import TaskData
from moleflow.portable import DetectorState, ProductState
from moleflow.sources import ResolvedSource

__all__ = ["TaskSettings", "evaluate_test_set", "learn_product"]

_EXTRACTORS: dict[tuple[str, str], Any] = {}  # per worker process: the backbone's weights load once, not per task


@dataclass(frozen=True)
class TaskSettings:
    """How a task runs: torch threads, device, feature cache directory (absolute), image-decoding workers."""

    threads: int
    device: str = "cpu"
    feature_cache: str | None = None
    num_workers: int = 0


def _detector(state: DetectorState, settings: TaskSettings, reporter: Any):
    """An unbound detector of ``state``; stages go to ``reporter`` (a Ray actor handle, or None)."""
    from moleflow.config import to_dict
    from moleflow.detector import Detector
    from moleflow.features.extractor import extractor_for

    torch.set_num_threads(settings.threads)  # same count as the driver's reference: same reductions, same bits
    key = (json.dumps(to_dict(state.cfg.model.backbone), sort_keys=True), state.cfg.router.feature, settings.device)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = extractor_for(state.cfg).to(settings.device)
    detector = Detector.from_state(
        state,
        device=settings.device,
        feature_cache=settings.feature_cache,
        num_workers=settings.num_workers,
        progress=False,
        extractor=_EXTRACTORS[key],
    )
    if reporter is not None:
        detector.on_stage = lambda name, stage: reporter.report.remote(name, stage)
    return detector


def learn_product(state: DetectorState, resolved: ResolvedSource, settings: TaskSettings, reporter: Any) -> ProductState:
    """Learn ``resolved.task`` against the frozen base of ``state``; its parts, prototype and record."""
    detector = _detector(state, settings, reporter)
    name = resolved.task.name
    detector.learn(name, resolved, replace=True, commit=False)  # replace: the shipped first products may hold it
    return detector.export_product(name)


def evaluate_test_set(state: DetectorState, task: TaskData, settings: TaskSettings, reporter: Any):
    """``(EvalSet, ProductEvaluation)`` of ``task``'s test set under the whole model of ``state``."""
    from moleflow.evaluation.evaluate import evaluate_product, prepare_eval_set

    detector = _detector(state, settings, reporter)
    if reporter is not None:
        reporter.report.remote(task.name, "extracting")
    eval_set = prepare_eval_set(detector, task)
    if reporter is not None:
        reporter.report.remote(task.name, "scoring")
    return eval_set, evaluate_product(detector, eval_set)
