"""Accuracy matrix, forgetting and routing bookkeeping against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moleflow.evaluation.protocol import (
    AccuracyMatrix,
    final_mean,
    forgetting,
    metrics_section,
    routing_accuracy,
    routing_confusion,
    routing_section,
)

# Three tasks. Rows: after training task i; columns: evaluated task j.
_ROWS = [
    [0.90],
    [0.80, 0.70],
    [0.85, 0.60, 0.95],
]


def _three_task() -> AccuracyMatrix:
    acc = AccuracyMatrix()
    for i, row in enumerate(_ROWS):
        acc.record_row(i, row)
    return acc


def test_three_task_summary_by_hand() -> None:
    out = _three_task().to_json()
    assert out["matrix"] == [[0.90, None, None], [0.80, 0.70, None], [0.85, 0.60, 0.95]]
    assert out["final"] == [0.85, 0.60, 0.95]
    # (0.85 + 0.60 + 0.95) / 3 = 0.8
    assert out["final_mean"] == pytest.approx(0.8)
    # task 0: best earlier max(0.90, 0.80) = 0.90, final 0.85 -> 0.05
    # task 1: best earlier 0.70, final 0.60 -> 0.10; the last task is not counted. Mean 0.075.
    assert out["forgetting"] == pytest.approx(0.075)


def test_forgetting_can_be_negative() -> None:
    # Backward transfer: task 0 goes 0.5 -> 0.7, forgetting = 0.5 - 0.7.
    assert forgetting([[0.5, None], [0.7, 0.9]]) == pytest.approx(-0.2)


def test_nulls_are_skipped() -> None:
    # Task 1 has no masks (pixel metric null everywhere); NaN is recorded as null too.
    acc = AccuracyMatrix()
    acc.record_row(0, [0.9])
    acc.record_row(1, [0.7, None])
    acc.record_row(2, [0.8, float("nan"), 0.6])
    out = acc.to_json()
    assert out["final"] == [0.8, None, 0.6]
    assert out["final_mean"] == pytest.approx(0.7)  # (0.8 + 0.6) / 2
    assert out["forgetting"] == pytest.approx(0.1)  # only task 0: max(0.9, 0.7) - 0.8


def test_null_inside_earlier_rows_is_skipped_in_max() -> None:
    # Task 0 unknown after task 1 but known when learned: best earlier = 0.6, final 0.5.
    assert forgetting([[0.6, None, None], [None, 0.9, None], [0.5, 0.9, 0.9]]) == pytest.approx(0.05)


def test_single_task_has_no_forgetting() -> None:
    acc = AccuracyMatrix()
    acc.record(0, 0, np.float32(0.75))
    out = acc.to_json()
    assert out == {"matrix": [[0.75]], "final": [0.75], "final_mean": 0.75, "forgetting": None}
    assert isinstance(out["final_mean"], float)


def test_all_null_gives_null_summaries() -> None:
    acc = AccuracyMatrix()
    acc.record_row(0, [None])
    acc.record_row(1, [None, float("nan")])
    out = acc.to_json()
    assert out["final_mean"] is None and out["forgetting"] is None


def test_empty() -> None:
    out = AccuracyMatrix().to_json()
    assert out == {"matrix": [], "final": [], "final_mean": None, "forgetting": None}
    assert final_mean([]) is None


def test_partial_run_is_square_over_learned_tasks() -> None:
    acc = AccuracyMatrix()
    acc.record(0, 0, 0.9)
    acc.record(1, 1, 0.8)  # task 0 not yet re-evaluated after task 1
    assert acc.num_tasks == 2
    assert acc.matrix == [[0.9, None], [None, 0.8]]
    assert acc.to_json()["forgetting"] is None


def test_json_serialisable_without_nan() -> None:
    section = metrics_section({"aupro": _three_task(), "image_auroc": _three_task()})
    assert list(section) == ["image_auroc", "aupro"]  # results.json order
    text = json.dumps(section, allow_nan=False)
    assert json.loads(text)["aupro"]["matrix"][0] == [0.9, None, None]


def test_from_rows_round_trip() -> None:
    original = _three_task()
    rebuilt = AccuracyMatrix.from_rows(original.matrix)
    assert rebuilt.to_json() == original.to_json()
    with pytest.raises(ValueError, match="not learned yet"):
        AccuracyMatrix.from_rows([[0.5, 0.5]])


def test_invalid_records_raise() -> None:
    acc = AccuracyMatrix()
    with pytest.raises(ValueError, match="evaluated <= trained"):
        acc.record(0, 1, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        acc.record(0, 0, 1.5)
    with pytest.raises(TypeError):
        acc.record(0, 0, "0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs 2 values"):
        acc.record_row(1, [0.5])


def test_routing_by_hand() -> None:
    true = [0, 0, 1, 1, 2]
    routed = [0, 1, 1, 1, 0]
    assert routing_accuracy(true, routed) == pytest.approx(3 / 5)
    assert routing_confusion(true, routed, 3) == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    section = routing_section(np.array(true), np.array(routed), 3)
    assert section == {"accuracy": pytest.approx(0.6), "confusion": [[1, 1, 0], [0, 2, 0], [1, 0, 0]]}
    json.dumps(section)


def test_routing_edge_cases() -> None:
    assert routing_accuracy([], []) is None
    assert routing_section([], [], 2) == {"accuracy": None, "confusion": [[0, 0], [0, 0]]}
    with pytest.raises(ValueError, match="in \\[0, 2\\)"):
        routing_confusion([0, 2], [0, 1], 2)
    with pytest.raises(ValueError, match="routed tasks"):
        routing_accuracy([0, 1], [0])
