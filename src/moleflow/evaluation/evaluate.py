"""Evaluating a :class:`~moleflow.detector.Detector` on products' test sets: the metrics of the protocol
(routed: product not given; oracle: product given) and what its calibrated thresholds give (recall,
false-alarm rate, known images wrongly rejected as unknown products).

Metrics are computed at the backbone's input resolution (masks resized with nearest neighbour).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moleflow.data.base import Sample, TaskData
from moleflow.evaluation.task_metrics import TASK_METRICS, task_metrics
from moleflow.features.cache import CachedFeatures
from moleflow.inference import ScoredBatch
from moleflow.prediction import ANOMALOUS, UNKNOWN

__all__ = ["METRICS", "EvalSet", "ProductEvaluation", "evaluate_product", "prepare_eval_set", "verdict_summary"]

METRICS = TASK_METRICS


@dataclass
class EvalSet:
    """One product's test data, extracted once: features, labels and masks at the evaluation size."""

    name: str
    samples: tuple[Sample, ...]
    features: CachedFeatures
    labels: np.ndarray  # (N,) {0, 1}
    masks: np.ndarray | None  # (N, S, S) uint8 {0, 1}; None when the product has no masks
    seconds: float


@dataclass
class ProductEvaluation:
    """The metrics of one product's test set, routed and oracle, and the routed verdicts."""

    name: str
    routed: dict[str, float | None]
    oracle: dict[str, float | None] | None
    operating_points: dict[str, float | None]  # routed: score thresholds of the F1 maxima and of PRO
    scored: ScoredBatch  # routed
    maps: np.ndarray | None  # (N, S, S) routed anomaly maps (products with masks)
    verdicts: list[str]
    summary: dict[str, float | int | None]


def prepare_eval_set(detector, task: TaskData) -> EvalSet:
    start = time.perf_counter()
    feats = detector.features(task.test, f"{task.name}: test features")
    size = detector.cfg.model.backbone.image_size
    masks = np.stack([_resize_mask(s.load_mask(), size) for s in task.test]) if task.has_masks else None
    labels = np.array([s.label for s in task.test], dtype=np.int64)
    return EvalSet(task.name, task.test, feats, labels, masks, time.perf_counter() - start)


def _metrics(detector, scored: ScoredBatch, es: EvalSet):
    """``(TaskMetrics, maps (N, S, S) or None)``; PRO is taken at the product's calibrated pixel threshold."""
    from moleflow.scoring import anomaly_maps

    maps = None
    if es.masks is not None:
        size = detector.cfg.model.backbone.image_size
        maps = anomaly_maps(scored.patch_scores, (size, size), detector.cfg.scoring.smoothing_sigma).numpy()
    threshold = detector.records[es.name].calibration.pixel_threshold if es.name in detector.records else None
    return task_metrics(scored.image_scores.numpy(), es.labels, maps, es.masks, threshold), maps


def evaluate_product(detector, es: EvalSet, oracle: bool = True) -> ProductEvaluation:
    """Routed (and, with ``oracle``, product-given) metrics and thresholded verdicts of ``es``."""
    routed = detector.score(es.features)
    routed_metrics, maps = _metrics(detector, routed, es)
    oracle_values = None
    if oracle:
        own = torch.full((len(es.labels),), detector.router.tasks.index(es.name), dtype=torch.long)
        oracle_values = _metrics(detector, detector.score(es.features, own), es)[0].values
    verdicts, _, _ = detector.decide(routed)
    summary = verdict_summary(verdicts, es.labels)
    return ProductEvaluation(
        es.name, routed_metrics.values, oracle_values, routed_metrics.operating_points, routed, maps, verdicts, summary
    )


def verdict_summary(verdicts: list[str], labels: np.ndarray) -> dict[str, float | int | None]:
    """Recall (anomalous images judged anomalous), false-alarm rate (normals judged anomalous) and the
    share of the product's images rejected as an unknown product, at the calibrated thresholds."""
    v = np.asarray(verdicts)
    anomalous, normal = labels == 1, labels == 0
    return {
        "images": int(labels.size),
        "anomalous": int(anomalous.sum()),
        "recall": float(np.mean(v[anomalous] == ANOMALOUS)) if anomalous.any() else None,
        "false_alarm_rate": float(np.mean(v[normal] == ANOMALOUS)) if normal.any() else None,
        "unknown_rate": float(np.mean(v == UNKNOWN)) if v.size else None,
    }


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return (F.interpolate(t, size=(size, size), mode="nearest")[0, 0] > 0.5).numpy().astype(np.uint8)
