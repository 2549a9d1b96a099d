"""Image AP, F1-max with its threshold, PRO at a threshold, and the per-task bundle, against hand counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moleflow.evaluation.metrics import (
    f1_max,
    image_ap,
    image_f1_max,
    pixel_f1_max,
    pro_at_threshold,
    pro_curve,
    region_overlaps,
)
from moleflow.evaluation.protocol import METRIC_NAMES, operating_points_section
from moleflow.evaluation.task_metrics import OPERATING_POINTS, task_metrics

# One 2x5 image (as in test_metrics). Regions (8-connected): A = {(0,0), (0,1)}, B = {(1,4)}.
MASK = np.array([[[1, 1, 0, 0, 0], [0, 0, 0, 0, 1]]])
MAP = np.array([[[0.9, 0.5, 0.8, 0.6, 0.5], [0.3, 0.2, 0.1, 0.05, 0.7]]])


def test_image_ap_by_hand() -> None:
    # ranked 0.9(+) 0.8(-) 0.7(+) 0.6(-): recall steps 1/2 at precision 1 and 2/3 -> 5/6
    assert image_ap(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # a tie is one threshold: 0.9(+) | 0.5(+) 0.5(-) | 0.1(-): 1/2 * 1 + 1/2 * 2/3
    assert image_ap(np.array([0.5, 0.5, 0.9, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    assert math.isnan(image_ap(np.array([0.1, 0.2]), np.array([0, 0])))


def test_f1_max_and_its_threshold_by_hand() -> None:
    # P = 3. F1 = 2 TP / (flagged + P) at t = .9 .8 .7 .6 .3 .2: 2/4, 4/5, 4/6, 6/7, 6/8, 6/9
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2])
    labels = np.array([1, 1, 0, 1, 0, 0])
    best = image_f1_max(scores, labels)
    assert best.value == pytest.approx(6 / 7) and best.threshold == 0.6


def test_f1_max_ties_go_to_the_lowest_threshold_and_tied_scores_are_one_point() -> None:
    # P = 2: t = .9 -> 2/3, .8 -> 2/4, .7 -> 2/5, .6 -> 4/6 = 2/3, .1 -> 4/7: the tie resolves to 0.6
    point = image_f1_max(np.array([0.9, 0.8, 0.7, 0.6, 0.1]), np.array([1, 0, 0, 1, 0]))
    assert point.value == pytest.approx(2 / 3) and point.threshold == 0.6
    # 0.5 holds a positive and a negative: flagged together, so F1 at 0.5 is 2*2/(3+2) = 0.8, not 1
    point = image_f1_max(np.array([0.9, 0.5, 0.5]), np.array([1, 1, 0]))
    assert point.value == pytest.approx(0.8) and point.threshold == 0.5


def test_pixel_f1_max_pools_pixels() -> None:
    # pixels ranked 0.9(A) 0.8 0.7(B) 0.6 0.5(A2 and a normal) ...; P = 3
    # t=.9: 2/4 | .8: 2/5 | .7: 4/6 | .6: 4/7 | .5: 6/(6+3) = 2/3 -> the tie with t=.7 goes to 0.5
    point = pixel_f1_max(MAP, MASK)
    assert point.value == pytest.approx(2 / 3) and point.threshold == 0.5
    assert all(math.isnan(x) for x in pixel_f1_max(MAP, np.zeros_like(MASK)))


def test_region_overlaps_and_pro_at_threshold_by_hand() -> None:
    np.testing.assert_allclose(region_overlaps(MAP, MASK, 0.7), [0.5, 1.0])  # A half flagged, B flagged
    assert pro_at_threshold(MAP, MASK, 0.7) == pytest.approx(0.75)
    assert pro_at_threshold(MAP, MASK, 0.5) == 1.0  # >= : the A pixel at exactly 0.5 counts
    assert pro_at_threshold(MAP, MASK, 0.95) == 0.0
    assert math.isnan(pro_at_threshold(MAP, np.zeros_like(MASK), 0.5))
    with pytest.raises(ValueError, match="finite"):
        pro_at_threshold(MAP, MASK, float("nan"))


def test_pro_at_each_score_is_a_point_of_the_pro_curve() -> None:
    rng = np.random.default_rng(3)
    maps = rng.random((3, 12, 12))
    masks = np.zeros((3, 12, 12), dtype=bool)
    masks[0, 2:5, 2:6] = masks[1, 7:11, 1:3] = masks[2, 0:2, 9:12] = masks[2, 8, 8] = True
    _, pro = pro_curve(maps, masks)
    distinct = np.unique(maps)[::-1]  # the curve's points after (0, 0), one per distinct score, descending
    for k in range(0, distinct.size, 17):
        assert pro_at_threshold(maps, masks, distinct[k]) == pytest.approx(pro[1 + k])


@settings(max_examples=60, deadline=None)
@given(
    scores=hnp.arrays(np.float64, st.integers(2, 30), elements=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 1.0])),
    data=st.data(),
)
def test_f1_max_equals_brute_force(scores: np.ndarray, data: st.DataObject) -> None:
    labels = data.draw(hnp.arrays(np.int64, scores.shape, elements=st.integers(0, 1)))
    point = f1_max(scores, labels)
    if labels.min() == labels.max():
        assert math.isnan(point.value)
        return
    best = max(
        (2 * np.sum((scores >= t) & (labels == 1)) / (np.sum(scores >= t) + labels.sum()), -t) for t in np.unique(scores)
    )
    assert point.value == pytest.approx(best[0]) and point.threshold == -best[1]


def test_task_metrics_bundle() -> None:
    scores, labels = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])
    bare = task_metrics(scores, labels)
    assert list(bare.values) == list(METRIC_NAMES) and list(bare.operating_points) == list(OPERATING_POINTS)
    assert bare.values["image_ap"] == pytest.approx(5 / 6)
    assert bare.values["pixel_auroc"] is None and bare.values["pro_at_threshold"] is None
    full = task_metrics(np.array([0.9]), np.array([1]), MAP, MASK, threshold=0.7)
    assert full.values["image_auroc"] is None  # one class: undefined -> None
    assert full.values["pro_at_threshold"] == pytest.approx(0.75)
    assert full.operating_points == {"image_f1_threshold": None, "pixel_f1_threshold": 0.5, "pro_threshold": 0.7}
    assert task_metrics(np.array([0.9]), np.array([1]), MAP, MASK).values["pro_at_threshold"] is None


def test_operating_points_section() -> None:
    section = operating_points_section({"a": {"image_f1_threshold": np.float32(2.5), "pro_threshold": float("nan")}})
    assert section == {"a": {"image_f1_threshold": 2.5, "pro_threshold": None}}
    with pytest.raises(ValueError, match="finite"):
        operating_points_section({"a": {"pro_threshold": float("inf")}})
    with pytest.raises(TypeError):
        operating_points_section({"a": {"pro_threshold": "high"}})
