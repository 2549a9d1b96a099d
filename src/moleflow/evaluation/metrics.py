"""Anomaly-detection metrics: image AUROC, pixel AUROC, pixel AP and AUPRO (numpy, exact).

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
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = ["aupro", "image_auroc", "pixel_ap", "pixel_auroc", "pro_curve"]

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
