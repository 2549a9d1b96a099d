"""Our AUPRO, F1-max and PRO against anomalib's, a second implementation written independently.

Skipped when anomalib is not installed (it is not a dependency: ``pip install anomalib`` to run these).
What agrees and what differs by design is written down in ``moleflow.evaluation.metrics``'s docstring.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

anomalib_metrics = pytest.importorskip("anomalib.metrics")
torch = pytest.importorskip("torch")

from moleflow.evaluation import metrics as M  # noqa: E402

# anomalib accumulates in float32; we in float64. Measured differences are below 1e-7.
TOL = 1e-6
MASK = np.array([[[1, 1, 0, 0, 0], [0, 0, 0, 0, 1]]], dtype=bool)
MAP = np.array([[[0.9, 0.5, 0.8, 0.6, 0.5], [0.3, 0.2, 0.1, 0.05, 0.7]]], dtype=np.float32)


def _blobs(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth noise maps ``(n, size, size)`` float32 and random disc masks on half the images."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n // 2):
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(0, size), rng.integers(0, size), rng.integers(2, size // 6)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    maps = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 3, 3))
    maps += 0.6 * ndimage.gaussian_filter(masks.astype(float), sigma=(0, 2, 2)) * rng.random((n, 1, 1))
    return maps.astype(np.float32), masks


def _theirs(metric, maps: np.ndarray, masks: np.ndarray) -> float:
    metric.update(SimpleNamespace(anomaly_map=torch.from_numpy(maps), gt_mask=torch.from_numpy(masks)))
    return float(metric.compute())


CASES = [(MAP, MASK), _blobs(4, 32, 0), _blobs(10, 64, 1), _blobs(6, 96, 2)]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_anomalib(case: int, fpr_limit: float) -> None:
    maps, masks = CASES[case]
    theirs = _theirs(anomalib_metrics.AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=fpr_limit), maps, masks)
    assert M.aupro(maps, masks, fpr_limit) == pytest.approx(theirs, abs=TOL)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_f1_max_and_threshold_match_anomalib(case: int) -> None:
    maps, masks = CASES[case]
    metric = anomalib_metrics.F1Max(fields=["anomaly_map", "gt_mask"])
    theirs = _theirs(metric, maps.ravel(), masks.ravel())
    ours = M.pixel_f1_max(maps, masks)
    assert ours.value == pytest.approx(theirs, abs=TOL)
    assert ours.threshold == pytest.approx(float(metric.threshold), abs=TOL)


@pytest.mark.parametrize("case", range(1, len(CASES)))
def test_pro_at_threshold_matches_anomalib_off_ties(case: int) -> None:
    maps, masks = CASES[case]
    threshold = float(np.quantile(maps, 0.8)) + 1e-4  # not a score value: '>' and '>=' agree
    metric = anomalib_metrics.PRO(fields=["anomaly_map", "gt_mask"], threshold=threshold)
    assert M.pro_at_threshold(maps, masks, threshold) == pytest.approx(_theirs(metric, maps, masks), abs=TOL)


def test_documented_differences() -> None:
    # a threshold equal to a score: anomalib flags '>' (A2 at 0.5 missed), we '>=' (A2 counted)
    metric = anomalib_metrics.PRO(fields=["anomaly_map", "gt_mask"], threshold=0.5)
    assert _theirs(metric, MAP, MASK) == pytest.approx(0.75)
    assert M.pro_at_threshold(MAP, MASK, 0.5) == 1.0
    # no anomalous region: anomalib's AUPRO is 0, ours undefined (NaN -> null in results.json)
    empty = np.zeros_like(MASK)
    assert _theirs(anomalib_metrics.AUPRO(fields=["anomaly_map", "gt_mask"]), MAP, empty) == 0.0
    assert math.isnan(M.aupro(MAP, empty))
