"""Every metric of one task's test set in one call: what the evaluation protocol records per task.

:func:`task_metrics` takes a task's image scores, labels and (when the task has masks) its anomaly maps
and masks, and returns the values of :data:`TASK_METRICS` (each in [0, 1] or ``None`` where it does not
apply) plus the task's operating points: the thresholds that reach the image and pixel F1-max, and the
threshold the per-region overlap was taken at.

``threshold`` is the task's calibrated decision threshold on the score scale (the image-score threshold
kept with each task's checkpoint). The anomaly maps are on that same scale (upsampled, smoothed patch
scores), so PRO at that threshold is the region overlap of the segmentation ``map >= threshold`` that a
user of ``moleflow predict`` would see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moleflow.evaluation import metrics as M
from moleflow.evaluation.protocol import METRIC_NAMES

__all__ = ["OPERATING_POINTS", "TASK_METRICS", "TaskMetrics", "task_metrics"]

#: The per-task metrics, in results.json order: the four of the first release, then the newer ones.
TASK_METRICS: tuple[str, ...] = METRIC_NAMES
#: The thresholds reported next to the metrics (score scale, not in [0, 1]).
OPERATING_POINTS: tuple[str, ...] = ("image_f1_threshold", "pixel_f1_threshold", "pro_threshold")


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass
class TaskMetrics:
    """``values``: metric -> value in [0, 1] or None; ``operating_points``: threshold name -> score or None."""

    values: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(TASK_METRICS))
    operating_points: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(OPERATING_POINTS))


def task_metrics(
    image_scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    threshold: float | None = None,
) -> TaskMetrics:
    """All metrics of one task.

    Args:
        image_scores: ``(N,)`` image anomaly scores.
        labels: ``(N,)`` 0 normal / 1 anomalous.
        maps: ``(N, H, W)`` anomaly maps, or None when the task has no masks.
        masks: ``(N, H, W)`` binary ground truth, or None (pixel metrics are then None).
        threshold: the task's calibrated threshold; PRO is taken at it (None: PRO not computed).

    Returns:
        The metric values and operating points; undefined ones (one class present) are None.
    """
    out = TaskMetrics()
    v, p = out.values, out.operating_points
    v["image_auroc"] = _finite(M.image_auroc(image_scores, labels))
    v["image_ap"] = _finite(M.image_ap(image_scores, labels))
    image_f1 = M.image_f1_max(image_scores, labels)
    v["image_f1_max"], p["image_f1_threshold"] = _finite(image_f1.value), _finite(image_f1.threshold)
    if maps is None or masks is None:
        return out
    v["pixel_auroc"] = _finite(M.pixel_auroc(maps, masks))
    v["pixel_ap"] = _finite(M.pixel_ap(maps, masks))
    v["aupro"] = _finite(M.aupro(maps, masks))
    pixel_f1 = M.pixel_f1_max(maps, masks)
    v["pixel_f1_max"], p["pixel_f1_threshold"] = _finite(pixel_f1.value), _finite(pixel_f1.threshold)
    if threshold is not None and math.isfinite(threshold):
        v["pro_at_threshold"] = _finite(M.pro_at_threshold(maps, masks, threshold))
        p["pro_threshold"] = float(threshold)
    return out
