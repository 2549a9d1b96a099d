"""Many products in one command: the first one (when the run has no base yet) learned here, normally;
every further one as its own Ray task against the frozen base; each committed to the run as it comes back.

Why a product learned in a task equals the product learned here: its parts start from
``training.product_seed(seed, name)`` (the name, not the order), it trains against the same frozen base
with its own batches, its calibration uses its own images only, and the task runs at the same torch thread
count (``RayOptions.threads``). Only its ``learned_at``, ``parts_id`` and ``seconds`` differ.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from moleflow.data.base import FileSample, TaskData
from moleflow.names import check_task_name
from moleflow.parallel.options import LearnReport, ParallelError, RayOptions
from moleflow.parallel.progress import ProgressBoard
from moleflow.parallel.tasks import TaskSettings, evaluate_test_set, learn_product
from moleflow.rundir import TaskRecord
from moleflow.sources import ResolvedSource
from moleflow.training import TrainingDivergedError

__all__ = ["evaluate_many", "learn_many"]

log = logging.getLogger(__name__)
FIRST_PRODUCTS_SHIPPED = 2  # a new product's whitening may start from the first product's (from_first_task)


def learn_many(
    detector,
    products: Sequence[tuple[str, Any]],
    *,
    parallel: RayOptions | None = None,
    replace: bool = False,
    data_root: Any = None,
    limits: tuple[int, int] | None = None,
    on_learned: Callable[[TaskRecord], None] | None = None,
) -> LearnReport:
    """See :meth:`moleflow.detector.Detector.learn_many`."""
    start, report = time.perf_counter(), LearnReport()
    names = [check_task_name(name) for name, _ in products]
    if len(set(names)) != len(names):
        raise ParallelError(f"product names must be unique, got {names}")
    if parallel is not None and detector.cfg.train.base_policy == "always_trainable":
        raise ParallelError(
            "train.base_policy=always_trainable retrains the shared base with every product: learn it without --parallel"
        )
    todo: list[ResolvedSource] = []
    for name, source in products:  # every source resolved (and checked) before anything is learned
        if name in detector.records and not replace:
            log.info("%s: skipped: already in the run (--replace relearns it)", name)
            report.skipped.append(name)
            continue
        todo.append(detector.resolve(name, source, data_root=data_root, limits=limits))

    def commit(record: TaskRecord) -> None:  # per product: its file and the index; derived files at the end
        on_learned(record) if on_learned is not None else detector.commit(write_router=False)
        report.learned.append(record.name)

    board = ProgressBoard([r.task.name for r in todo], bar=detector.progress)
    with board.shown():
        if parallel is None:
            for resolved in todo:
                _learn_here(detector, resolved, replace, board, commit, report)
        elif todo:
            if detector.base_id is None:  # the base trains with the first product, here: nothing is frozen yet
                first = todo.pop(0)
                _learn_here(detector, first, replace, board, commit, report)
                if first.task.name in report.failed:
                    raise ParallelError(
                        f"the first product trains the shared base and failed: {report.failed[first.task.name]}"
                    )
            if todo:
                _learn_on_ray(detector, todo, parallel, replace, board, commit, report)
    if report.learned and on_learned is None:
        detector.commit()  # the router file, once
    report.seconds = time.perf_counter() - start
    return report


def _learn_here(
    detector, resolved: ResolvedSource, replace: bool, board: ProgressBoard, commit, report: LearnReport
) -> None:
    name, previous = resolved.task.name, detector.on_stage
    detector.on_stage = board.stage
    try:
        record = detector.learn(name, resolved, replace=replace, commit=False)
    except (ValueError, TrainingDivergedError) as e:  # bad data or settings: this product only
        report.failed[name] = str(e)
        board.failed(name, str(e))
        return
    finally:
        detector.on_stage = previous
    commit(record)
    board.done(name, _detail(record))


def _learn_on_ray(detector, todo, options: RayOptions, replace: bool, board: ProgressBoard, commit, report) -> None:
    from moleflow.parallel.ray_backend import run_tasks

    threads = options.task_threads()
    if threads != _torch_threads():
        log.info(
            "tasks use %d torch threads, this process %d: products equal sequential learning at %d",
            threads,
            _torch_threads(),
            threads,
        )
    detector.load_all()
    shipped = detector.export_state(detector.model.tasks[:FIRST_PRODUCTS_SHIPPED])

    def adopt(name: str, product) -> str:
        record = detector.adopt(product, replace=replace, commit=False)
        commit(record)
        return _detail(record)

    calls = {r.task.name: (_absolute(r), _settings(detector, options)) for r in todo}
    report.failed.update(run_tasks(learn_product, shipped, calls, options, board, adopt))


def evaluate_many(detector, tasks: Mapping[str, TaskData], options: RayOptions, on_result: Callable[[str, Any], None]):
    """Extract and score each product's test set as its own Ray task under the detector's whole model;
    ``on_result(name, (EvalSet, ProductEvaluation))`` as each finishes. Returns ``{product: why}`` of failures."""
    from moleflow.parallel.ray_backend import run_tasks

    board = ProgressBoard(list(tasks), what="evaluated", bar=detector.progress)
    state = detector.export_state(detector.products)
    calls = {name: (_absolute_task(task), _settings(detector, options)) for name, task in tasks.items()}

    def take(name: str, value) -> str:
        on_result(name, value)
        return ""

    with board.shown():
        return run_tasks(evaluate_test_set, state, calls, options, board, take)


def _settings(detector, options: RayOptions) -> TaskSettings:
    cache = str(Path(detector.feature_cache).resolve()) if detector.feature_cache is not None else None
    device = "cuda" if options.gpus_per_task > 0 else "cpu"
    return TaskSettings(options.task_threads(), device, cache, detector.num_workers)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _detail(record: TaskRecord) -> str:
    took = ", ".join(f"{k} {v:.1f}s" for k, v in record.seconds.items())
    return f"{record.train_images} images ({took}), threshold {record.calibration.image_threshold:.4g}"


def _absolute(resolved: ResolvedSource) -> ResolvedSource:
    return dataclasses.replace(resolved, task=_absolute_task(resolved.task))


def _absolute_task(task: TaskData) -> TaskData:
    """``task`` with absolute image and mask paths: a worker's working directory is not the driver's."""

    def fix(sample):
        if not isinstance(sample, FileSample):
            return sample
        mask = sample.mask_path.resolve() if sample.mask_path is not None else None
        return dataclasses.replace(sample, image_path=Path(sample.image_path).resolve(), mask_path=mask)

    return dataclasses.replace(task, train=tuple(map(fix, task.train)), test=tuple(map(fix, task.test)))
