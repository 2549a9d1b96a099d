"""Anomaly-detection metrics (numpy, exact): image AUROC and AP, pixel AUROC and AP, AUPRO, F1-max with
the threshold reaching it (image and pixel level), and the per-region overlap at a given threshold.

Conventions shared by every metric here:

* Higher score = more anomalous; label / mask 1 = anomalous, 0 = normal.
* Labels and masks must be binary (``bool`` or values in ``{0, 1}``); anything else raises ``ValueError``
  (a resized float mask is the caller's to binarise, not ours to guess).
* Scores containing NaN or +-inf raise ``ValueError`` naming the metric and the number of bad values.
* When only one class is present (no anomalous, or no normal, images / pixels) the metric is undefined
  and ``float("nan")`` is returned; the evaluation protocol writes it to results.json as ``null``.

AUPRO follows Bergmann et al., "The MVTec Anomaly Detection Dataset" (IJCV 2021), section 4.2, and the
official MVTec evaluation code (``compute_pro`` + ``trapezoid``):

* Ground-truth regions are the **8-connected** components of each image's mask (the reference labels with
  ``scipy.ndimage.label(mask, np.ones((3, 3)))``); regions never span two images.
* At a threshold ``t``, PRO(t) = mean over all regions (of all images) of the fraction of the region's
  pixels with score ``>= t``; FPR(t) = fraction of all normal pixels (mask 0, in every image, including
  the background of anomalous images) with score ``>= t``.
* The curve is exact: all scores are sorted once and every distinct score is a threshold; tied scores
  form one curve point (a straight segment between neighbouring points, as for ROC curves). The curve
  starts at (0, 0) and ends at (1, 1).
* The area under PRO(FPR) on ``[0, fpr_limit]`` is taken with the trapezoidal rule, the curve being
  linearly interpolated at exactly ``fpr_limit``, then divided by ``fpr_limit`` (a perfect map scores 1).

Thresholded metrics flag a sample or pixel when its score is ``>= threshold`` (the convention of every
curve here; ``moleflow predict``'s verdict uses ``>``, which differs only for a score equal to it).

Checked against anomalib 2.7 (``tests/test_metrics_anomalib.py``, skipped without anomalib; realistic
size: ``benchmarks/aupro_vs_anomalib.py``, 40 maps of 224x224: AUPRO at FPR limits 0.05 / 0.3 / 1 differ
by +3.3e-8 / +1.7e-8 / -1.9e-8, pixel F1-max by 9.5e-9 at the same threshold). The two define the
curve the same way: 8-connected regions (anomalib labels with OpenCV, default connectivity 8), one point
per distinct score, linear interpolation at ``fpr_limit``, area divided by ``fpr_limit``; F1-max over
every distinct score with ties to the lowest threshold. The remaining difference is round-off: anomalib
casts scores to float32 and accumulates its cumulative sums in float32, we in float64 (so anomalib also
merges scores that differ only beyond float32 precision into one curve point). Where they differ by design:

* no anomalous region or no normal pixel: anomalib's AUPRO is 0 and its PRO 1; ours are NaN (undefined),
  written to results.json as null;
* ``PRO`` at a threshold: anomalib flags ``score > threshold``, we ``score >= threshold``;
* a one-class input to F1-max: anomalib returns a number, we NaN (F1 is undefined without positives).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = [
    "OperatingPoint",
    "aupro",
    "f1_max",
    "image_ap",
    "image_auroc",
    "image_f1_max",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
    "pro_at_threshold",
    "pro_curve",
    "region_overlaps",
]

# 8-connectivity inside each image, none across the image axis of an (N, H, W) stack.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=int)
_REGION_STRUCTURE[1] = 1


def _check_scores(metric: str, scores: np.ndarray) -> np.ndarray:
    """Return ``scores`` as a float array; raise if any value is NaN or infinite."""
    arr = np.asarray(scores)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{metric}: scores must be real numbers, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ValueError(f"{metric}: scores contain {bad} non-finite value(s) (NaN or inf) out of {arr.size}")
    return arr


def _check_binary(metric: str, what: str, values: np.ndarray) -> np.ndarray:
    """Return ``values`` as a bool array; raise unless every value is 0 or 1."""
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr
    is_zero, is_one = arr == 0, arr == 1
    if not np.all(is_zero | is_one):
        raise ValueError(f"{metric}: {what} must be binary (0/1 or bool), got values other than 0 and 1")
    return is_one


def _check_pair(metric: str, scores: np.ndarray, targets: np.ndarray, what: str) -> tuple[np.ndarray, ...]:
    """Validate a (scores, binary targets) pair of equal shape; return (float scores, bool targets)."""
    s = _check_scores(metric, scores)
    t = _check_binary(metric, what, targets)
    if s.shape != t.shape:
        raise ValueError(f"{metric}: scores have shape {s.shape} but {what} have shape {t.shape}")
    if s.size == 0:
        raise ValueError(f"{metric}: empty input")
    return s, t


def _one_class(targets: np.ndarray) -> bool:
    """True when ``targets`` (bool) are all positive or all negative."""
    positives = int(np.count_nonzero(targets))
    return positives == 0 or positives == targets.size


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of image scores.

    Args:
        scores: ``(N,)`` image anomaly scores.
        labels: ``(N,)`` 1 for anomalous images, 0 for normal ones.

    Returns:
        AUROC in [0, 1] (ties count one half), or NaN if only one class is present.
    """
    s, t = _check_pair("image_auroc", scores, labels, "labels")
    if s.ndim != 1:
        raise ValueError(f"image_auroc: expected 1-D scores (N,), got shape {s.shape}")
    if _one_class(t):
        return float("nan")
    return float(roc_auc_score(t, s))


def image_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of image scores, ``sum_n (R_n - R_{n-1}) P_n`` (scikit-learn's definition).

    Args:
        scores: ``(N,)`` image anomaly scores.
        labels: ``(N,)`` 1 for anomalous images, 0 for normal ones.

    Returns:
        AP in [0, 1], or NaN if only one class is present.
    """
    s, t = _check_pair("image_ap", scores, labels, "labels")
    if s.ndim != 1:
        raise ValueError(f"image_ap: expected 1-D scores (N,), got shape {s.shape}")
    if _one_class(t):
        return float("nan")
    return float(average_precision_score(t, s))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Area under the ROC curve over all pixels of all images pooled.

    Args:
        maps: ``(N, H, W)`` anomaly maps.
        masks: ``(N, H, W)`` ground-truth masks, 1 = anomalous pixel.

    Returns:
        AUROC in [0, 1], or NaN if the masks hold only one class.
    """
    return _pooled_pixels("pixel_auroc", roc_auc_score, maps, masks)


def pixel_ap(maps: np.ndarray, masks: np.ndarray) -> float:
    """Average precision over all pixels pooled: ``sum_n (R_n - R_{n-1}) P_n`` (scikit-learn's definition).

    Args:
        maps: ``(N, H, W)`` anomaly maps.
        masks: ``(N, H, W)`` ground-truth masks, 1 = anomalous pixel.

    Returns:
        AP in [0, 1], or NaN if the masks hold only one class.
    """
    return _pooled_pixels("pixel_ap", average_precision_score, maps, masks)


def _pooled_pixels(metric: str, score_fn, maps: np.ndarray, masks: np.ndarray) -> float:
    """``score_fn(labels, scores)`` over all pixels of all images pooled; NaN for a single class."""
    s, t = _check_pair(metric, maps, masks, "masks")
    if _one_class(t):
        return float("nan")
    return float(score_fn(t.ravel(), s.ravel()))


def _quantize(scores: np.ndarray, num_thresholds: int) -> np.ndarray:
    """Snap each score down to the nearest of ``num_thresholds`` evenly spaced thresholds in [min, max]."""
    if num_thresholds < 2:
        raise ValueError(f"aupro: num_thresholds must be >= 2 or None, got {num_thresholds}")
    lo, hi = float(scores.min()), float(scores.max())
    if hi == lo:
        return scores
    thresholds = np.linspace(lo, hi, num_thresholds)
    idx = np.searchsorted(thresholds, scores, side="right") - 1
    return thresholds[np.clip(idx, 0, num_thresholds - 1)]


def pro_curve(maps: np.ndarray, masks: np.ndarray, num_thresholds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The exact per-region-overlap curve (see the module docstring for the definition).

    Args:
        maps: ``(N, H, W)`` anomaly maps.
        masks: ``(N, H, W)`` ground-truth masks, 1 = anomalous pixel.
        num_thresholds: ``None`` uses every distinct score as a threshold (exact). An integer snaps the
            scores down to that many evenly spaced thresholds in [min, max] first (a coarser curve).

    Returns:
        ``(fpr, pro)``, both ``(K,)`` float64, FPR non-decreasing, from (0, 0) to (1, 1). Empty arrays
        when the masks have no region or no normal pixel (the curve is undefined).
    """
    s, t = _check_pair("aupro", maps, masks, "masks")
    if s.ndim != 3:
        raise ValueError(f"aupro: expected (N, H, W) maps and masks, got shape {s.shape}")
    labeled, num_regions = ndimage.label(t, structure=_REGION_STRUCTURE)
    num_normal = int(t.size - np.count_nonzero(t))
    if num_regions == 0 or num_normal == 0:
        return np.empty(0), np.empty(0)
    if num_thresholds is not None:
        s = _quantize(s, num_thresholds)
    labeled = labeled.ravel()
    # Each pixel of region r raises PRO by 1 / (|r| * num_regions) once the threshold passes it.
    region_sizes = np.bincount(labeled).astype(np.float64)
    region_weight = np.zeros_like(region_sizes)
    region_weight[1:] = 1.0 / (region_sizes[1:] * num_regions)
    order = np.argsort(s.ravel())[::-1]
    sorted_scores = s.ravel()[order]
    # One point per distinct score: the last position of each run of equal scores.
    keep = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    del sorted_scores
    sorted_labels = labeled[order]
    del order, labeled
    fpr = (np.cumsum(sorted_labels == 0, dtype=np.float64) / num_normal)[keep]
    pro = np.cumsum(region_weight[sorted_labels])[keep]
    del sorted_labels
    # Clip the round-off of the long cumulative sums so the curve never leaves [0, 1].
    fpr, pro = np.minimum(fpr, 1.0), np.minimum(pro, 1.0)
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under ``y(x)`` on ``[x[0], x_max]``, interpolating y linearly at ``x_max``.

    ``x`` must be non-decreasing (repeated values are vertical steps) with ``x[0] <= x_max``.
    """
    end = int(np.searchsorted(x, x_max, side="right"))  # x[:end] <= x_max < x[end:]
    xs, ys = x[:end], y[:end]
    if end < len(x) and xs[-1] < x_max:
        frac = (x_max - x[end - 1]) / (x[end] - x[end - 1])
        y_max = y[end - 1] + frac * (y[end] - y[end - 1])
        xs, ys = np.append(xs, x_max), np.append(ys, y_max)
    return float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (Bergmann et al. 2021; module docstring).

    Args:
        maps: ``(N, H, W)`` anomaly maps.
        masks: ``(N, H, W)`` ground-truth masks, 1 = anomalous pixel; regions are 8-connected components.
        fpr_limit: upper integration limit on the FPR axis, in (0, 1]; 0.3 is the MVTec AD standard.
        num_thresholds: ``None`` for the exact curve, else the number of evenly spaced thresholds.

    Returns:
        ``area / fpr_limit`` in [0, 1], or NaN if no anomalous region or no normal pixel exists.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(maps, masks, num_thresholds)
    if fpr.size == 0:
        return float("nan")
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------- operating points


class OperatingPoint(NamedTuple):
    """A metric at the threshold that reaches it; flag a sample when its score is ``>= threshold``."""

    value: float
    threshold: float


def f1_max(scores: np.ndarray, targets: np.ndarray, metric: str = "f1_max") -> OperatingPoint:
    """The best F1 over every threshold, and that threshold (scores and targets of any equal shape, pooled).

    Every distinct score ``t`` is a threshold (flag ``score >= t``); with TP and FP counted at ``t`` and P
    positives, ``F1 = 2 TP / (TP + FP + P)`` (= 2PR / (P + R)). Ties in F1 go to the lowest threshold,
    as anomalib's ``F1Max`` does. NaN (value and threshold) when only one class is present.
    """
    s, t = _check_pair(metric, scores, targets, "targets")
    if _one_class(t):
        return OperatingPoint(float("nan"), float("nan"))
    order = np.argsort(s.ravel(), kind="stable")[::-1]
    sorted_scores, sorted_targets = s.ravel()[order], t.ravel()[order]
    keep = np.append(sorted_scores[1:] != sorted_scores[:-1], True)  # last position of each tied run
    tp = np.cumsum(sorted_targets, dtype=np.int64)
    flagged = np.arange(1, tp.size + 1)
    positives = tp[-1]
    tp, flagged, thresholds = tp[keep], flagged[keep], sorted_scores[keep]
    f1 = 2.0 * tp / (flagged + positives)  # TP + FP = flagged
    best = f1.size - 1 - int(np.argmax(f1[::-1]))  # thresholds descend: the last maximum is the lowest one
    return OperatingPoint(float(f1[best]), float(thresholds[best]))


def image_f1_max(scores: np.ndarray, labels: np.ndarray) -> OperatingPoint:
    """:func:`f1_max` of image scores ``(N,)`` against labels ``(N,)``."""
    if np.ndim(scores) != 1:
        raise ValueError(f"image_f1_max: expected 1-D scores (N,), got shape {np.shape(scores)}")
    return f1_max(scores, labels, "image_f1_max")


def pixel_f1_max(maps: np.ndarray, masks: np.ndarray) -> OperatingPoint:
    """:func:`f1_max` over all pixels of ``(N, H, W)`` maps and masks pooled."""
    return f1_max(maps, masks, "pixel_f1_max")


def region_overlaps(maps: np.ndarray, masks: np.ndarray, threshold: float) -> np.ndarray:
    """Per ground-truth region, the fraction of its pixels with score ``>= threshold``.

    Args:
        maps: ``(N, H, W)`` anomaly maps.
        masks: ``(N, H, W)`` ground-truth masks; regions are the 8-connected components of each image.
        threshold: the pixel decision threshold, e.g. a task's calibrated threshold.

    Returns:
        ``(R,)`` float64 overlaps in [0, 1], regions in label order (image by image, row-major).
    """
    s, t = _check_pair("pro_at_threshold", maps, masks, "masks")
    if s.ndim != 3:
        raise ValueError(f"pro_at_threshold: expected (N, H, W) maps and masks, got shape {s.shape}")
    if not np.isfinite(threshold):
        raise ValueError(f"pro_at_threshold: threshold must be a finite number, got {threshold}")
    labeled, num_regions = ndimage.label(t, structure=_REGION_STRUCTURE)
    if num_regions == 0:
        return np.empty(0)
    sizes = np.bincount(labeled.ravel(), minlength=num_regions + 1)
    hits = np.bincount(labeled.ravel(), weights=(s >= threshold).ravel(), minlength=num_regions + 1)
    return hits[1:] / sizes[1:]


def pro_at_threshold(maps: np.ndarray, masks: np.ndarray, threshold: float) -> float:
    """PRO at one threshold: the mean of :func:`region_overlaps` (every region counts once, whatever its
    size). NaN when the masks hold no region."""
    overlaps = region_overlaps(maps, masks, threshold)
    return float(overlaps.mean()) if overlaps.size else float("nan")
