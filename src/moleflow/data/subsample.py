"""Deterministic subsampling of a task, for quick runs (the demo) on large datasets."""

from __future__ import annotations

import dataclasses

from moleflow.data.base import Sample, TaskData


def _evenly(samples: tuple[Sample, ...], limit: int) -> tuple[Sample, ...]:
    """``limit`` samples spread evenly over the (sorted) sequence; all of them if it is short enough."""
    if len(samples) <= limit:
        return samples
    step = len(samples) / limit
    return tuple(samples[int(i * step)] for i in range(limit))


def subsample_task(task: TaskData, max_train: int, max_test: int) -> TaskData:
    """At most ``max_train`` training and ``max_test`` test images; the test set keeps half normals and
    half anomalous images where both are available, so its metrics stay meaningful."""
    normal = tuple(s for s in task.test if s.label == 0)
    anomalous = tuple(s for s in task.test if s.label == 1)
    n_normal = min(len(normal), max(max_test - len(anomalous), max_test // 2))
    test = _evenly(normal, n_normal) + _evenly(anomalous, max_test - n_normal)
    if len(task.train) <= max_train and test == task.test:
        return task
    return dataclasses.replace(
        task,
        train=_evenly(task.train, max_train),
        test=test,
        source=f"{task.source} (subsampled to {min(max_train, len(task.train))} train / {len(test)} test)",
    )
