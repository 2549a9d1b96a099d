"""Metrics against values computed by hand (pair counting, precision/recall sums, PRO curves drawn out)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import ndimage

from moleflow.evaluation.metrics import aupro, image_auroc, pixel_ap, pixel_auroc, pro_curve

# --------------------------------------------------------------------------- AUROC / AP


def test_image_auroc_by_pair_counting() -> None:
    # positives {0.35, 0.8}, negatives {0.1, 0.4}: pairs (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    assert image_auroc(scores, labels) == pytest.approx(0.75)


def test_image_auroc_ties_count_half() -> None:
    # positives {0.5, 0.9}, negatives {0.5, 0.1}: 0.5=0.5 counts 1/2, the other three pairs 1 -> 3.5/4
    scores = np.array([0.5, 0.9, 0.5, 0.1])
    labels = np.array([1, 1, 0, 0])
    assert image_auroc(scores, labels) == pytest.approx(0.875)


def test_image_auroc_perfect_and_inverted() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.7, 0.8, 0.9])
    assert image_auroc(scores, labels) == 1.0
    assert image_auroc(-scores, labels) == 0.0


def test_pixel_auroc_pools_all_pixels() -> None:
    # Same 4 values as the image case, split over two 1x2 "images": still 3/4.
    maps = np.array([[[0.1, 0.4]], [[0.35, 0.8]]])
    masks = np.array([[[0, 0]], [[1, 1]]])
    assert pixel_auroc(maps, masks) == pytest.approx(0.75)


def test_pixel_ap_by_hand() -> None:
    # Ranked: 0.9(+) 0.8(-) 0.7(+) 0.6(-). Recall steps of 1/2 at ranks 1 and 3 with precisions 1 and 2/3:
    # AP = 0.5 * 1 + 0.5 * 2/3 = 5/6.
    maps = np.array([[[0.9, 0.8], [0.7, 0.6]]])
    masks = np.array([[[1, 0], [1, 0]]])
    assert pixel_ap(maps, masks) == pytest.approx(5 / 6)


def test_pixel_ap_perfect() -> None:
    maps = np.array([[[0.9, 0.1], [0.8, 0.2]]])
    masks = np.array([[[1, 0], [1, 0]]], dtype=bool)
    assert pixel_ap(maps, masks) == pytest.approx(1.0)


# --------------------------------------------------------------------------- AUPRO

# One 2x5 image. Regions (8-connected): A = {(0,0), (0,1)} (2 px), B = {(1,4)} (1 px); 7 normal pixels.
_MASK = np.array([[[1, 1, 0, 0, 0], [0, 0, 0, 0, 1]]])
# A1 0.9 | n 0.8 | B 0.7 | n 0.6 | n 0.5 | A2 0.5 (tied with a normal pixel) | n 0.3 0.2 0.1 0.05
_MAP = np.array([[[0.9, 0.5, 0.8, 0.6, 0.5], [0.3, 0.2, 0.1, 0.05, 0.7]]])


def test_pro_curve_points_by_hand() -> None:
    # t=0.9: A half covered -> PRO = (1/2 + 0)/2 = 1/4, FPR 0
    # t=0.8: FPR 1/7 | t=0.7: B covered -> PRO 3/4 | t=0.6: FPR 2/7
    # t=0.5: A2 and a normal pixel enter together -> (3/7, 1): one point, a sloped segment from (2/7, 3/4)
    # then FPR 4/7 .. 7/7 at PRO 1, and the closing (1, 1).
    fpr, pro = pro_curve(_MAP, _MASK)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 7, 1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 0.75, 1, 1, 1, 1, 1, 1])


def test_aupro_interpolates_at_fpr_limit() -> None:
    # Area on [0, 0.3]: [0,1/7] at 1/4 -> 0.25/7; [1/7,2/7] at 3/4 -> 0.75/7;
    # on [2/7, 0.3] the segment (2/7, 3/4)-(3/7, 1) gives PRO(0.3) = 3/4 + 1/4 * (0.3 - 2/7) * 7 = 0.775,
    # trapezoid 0.5 * (0.75 + 0.775) * (0.1/7) = 0.07625/7.  Total 1.07625/7; divided by 0.3 -> 0.5125.
    assert aupro(_MAP, _MASK, fpr_limit=0.3) == pytest.approx(0.5125)


def test_aupro_full_range() -> None:
    # fpr_limit 1: previous pieces up to 2/7 (1/7), the sloped trapezoid 0.5*(3/4+1)/7 = 0.875/7,
    # then PRO 1 over [3/7, 1] = 4/7.  Total (0.25 + 0.75 + 0.875 + 4)/7 = 5.875/7.
    assert aupro(_MAP, _MASK, fpr_limit=1.0) == pytest.approx(5.875 / 7)


def test_aupro_averages_regions_not_pixels() -> None:
    # Stripes: image 0 is normal (1x4) with one false positive at 0.9; image 1 has a 2-px region.
    # Normal pixels = 4 + 2 = 6. Curve: (1/6, 0) after the FP, then the region fills up at FPR 1/6,
    # the remaining 5 normal pixels (all 0.1) end at (1, 1).
    # Area on [0, 0.3] = 0 on [0, 1/6] + 1 * (0.3 - 1/6) -> / 0.3 = 4/9.
    maps = np.array([[[0.9, 0.1, 0.1, 0.1]], [[0.1, 0.8, 0.2, 0.1]]])
    masks = np.array([[[0, 0, 0, 0]], [[0, 1, 1, 0]]])
    assert aupro(maps, masks) == pytest.approx(4 / 9)


def test_aupro_uses_eight_connectivity() -> None:
    # Diagonal pair {(0,0), (1,1)} is ONE region under 8-connectivity, plus an isolated region {(0,3)}.
    # Scores: (0,0) and (0,3) at 1.0 (above all normals at 0.0), (1,1) at 0.0 with the normals.
    # 8-conn: PRO at FPR 0 = (1/2 + 1)/2 = 3/4 (4-conn would give (1 + 0 + 1)/3 = 2/3).
    # Then everything else enters together: straight to (1, 1). Area on [0, 0.3]: 0.3 * (3/4 + 3/4 + 0.3/4)/2
    # = 0.3 * (0.75 + 0.0375) -> normalised 0.7875.
    mask = np.array([[[1, 0, 0, 1], [0, 1, 0, 0]]])
    maps = np.array([[[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    fpr, pro = pro_curve(maps, mask)
    np.testing.assert_allclose(pro[:2], [0.0, 0.75])
    assert aupro(maps, mask) == pytest.approx(0.7875)


def test_aupro_all_ties_is_diagonal() -> None:
    # Every pixel tied: the curve is the straight line (0,0)-(1,1); area on [0, 0.3] = 0.045 -> 0.15.
    masks = np.zeros((2, 4, 4), dtype=int)
    masks[1, 1:3, 1:3] = 1
    assert aupro(np.ones((2, 4, 4)), masks) == pytest.approx(0.15)


def test_aupro_perfect_and_inverted() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), dtype=np.uint8)
    masks[0, 2:5, 2:9] = 1
    masks[0, 10:14, 10:12] = 1
    masks[2, 0:3, 13:16] = 1
    maps = rng.random(masks.shape) * 0.5 + masks  # every anomalous pixel above every normal one
    assert aupro(maps, masks) == pytest.approx(1.0)
    assert aupro(-maps, masks) == pytest.approx(0.0)


def test_aupro_num_thresholds_approximates_exact() -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 32, 32), dtype=np.uint8)
    masks[1, 5:12, 5:20] = 1
    masks[3, 20:30, 3:8] = 1
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    exact = aupro(maps, masks)
    assert aupro(maps, masks, num_thresholds=5000) == pytest.approx(exact, abs=2e-3)
    # With 2 thresholds every score but the maximum snaps to the minimum: almost a diagonal.
    assert aupro(maps, masks, num_thresholds=2) == pytest.approx(0.15, abs=1e-2)


def _brute_force_pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Direct definition: for every distinct threshold, loop over regions and count normal pixels."""
    regions = []
    for image_map, mask in zip(maps, masks, strict=True):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [image_map[labeled == k] for k in range(1, n + 1)]
    normal = maps[masks == 0]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(float(np.mean(normal >= t)))
        pro.append(float(np.mean([np.mean(r >= t) for r in regions])))
    return np.array(fpr + [1.0]), np.array(pro + [1.0])


def test_pro_curve_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    masks = (rng.random((3, 9, 9)) < 0.15).astype(np.uint8)  # many small, irregular regions
    masks[1] = 0
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 1)  # rounding creates many ties
    fpr, pro = pro_curve(maps, masks)
    ref_fpr, ref_pro = _brute_force_pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)


def test_aupro_is_fast_on_realistic_size() -> None:
    rng = np.random.default_rng(2)
    masks = np.zeros((100, 256, 256), dtype=np.uint8)
    masks[::2, 100:140, 60:200] = 1
    maps = rng.random(masks.shape, dtype=np.float32) + 0.5 * masks
    start = time.perf_counter()
    value = aupro(maps, masks)
    assert time.perf_counter() - start < 5.0
    assert 0.0 < value < 1.0


# --------------------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("fill", [0, 1])
def test_single_class_gives_nan(fill: int) -> None:
    maps = np.random.default_rng(0).random((2, 3, 3))
    masks = np.full((2, 3, 3), fill)
    assert math.isnan(pixel_auroc(maps, masks))
    assert math.isnan(pixel_ap(maps, masks))
    assert math.isnan(aupro(maps, masks))
    assert math.isnan(image_auroc(np.array([0.1, 0.2]), np.array([fill, fill])))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise(bad: float) -> None:
    maps = np.zeros((1, 2, 2))
    maps[0, 0, 0] = bad
    maps[0, 1, 1] = bad
    masks = np.array([[[1, 0], [0, 0]]])
    for metric in (pixel_auroc, pixel_ap, aupro):
        with pytest.raises(ValueError, match=rf"{metric.__name__}.*2 non-finite"):
            metric(maps, masks)
    with pytest.raises(ValueError, match="image_auroc.*1 non-finite"):
        image_auroc(np.array([0.1, np.nan]), np.array([0, 1]))


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="binary"):
        pixel_auroc(np.zeros((1, 2, 2)), np.full((1, 2, 2), 0.5))
    with pytest.raises(ValueError, match="shape"):
        pixel_ap(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.zeros((1, 2, 2)), np.eye(2)[None], fpr_limit=0.0)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        aupro(np.zeros((2, 2)), np.eye(2))
