"""Continual evaluation bookkeeping: the accuracy matrix, forgetting, routing, and results.json sections.

The accuracy matrix of a run over T tasks (learned in order 0..T-1) holds, for one metric,
``matrix[i][j]`` = the metric on task j's test set after training task i, for ``j <= i``; entries with
``j > i`` (task not yet learned) are ``None``. An entry is also ``None`` when the metric does not apply
(e.g. pixel metrics of a task without masks) or was undefined (NaN, e.g. a test set with one class).

Everything here is plain Python; the JSON-ready dicts use ``None`` for JSON ``null`` and Python floats
otherwise (see the results.json contract in DESIGN.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real

__all__ = [
    "METRIC_NAMES",
    "AccuracyMatrix",
    "final_mean",
    "final_row",
    "forgetting",
    "metrics_section",
    "operating_points_section",
    "routing_accuracy",
    "routing_confusion",
    "routing_section",
]

#: The metrics results.json reports, in its order (later releases only append).
METRIC_NAMES: tuple[str, ...] = (
    "image_auroc",
    "pixel_auroc",
    "pixel_ap",
    "aupro",
    "image_ap",
    "image_f1_max",
    "pixel_f1_max",
    "pro_at_threshold",
)

Matrix = list[list[float | None]]


def _clean(value: float | None, where: str) -> float | None:
    """Return ``value`` as a Python float in [0, 1], or ``None`` for None / NaN; raise otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{where}: expected a number or None, got {type(value).__name__}")
    number = float(value)
    if math.isnan(number):
        return None
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{where}: metric values must lie in [0, 1], got {number}")
    return number


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the non-null values, ``None`` if there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def final_row(matrix: Matrix) -> list[float | None]:
    """The last row, ``matrix[T-1]``: every task after the last one is learned (``[]`` when T = 0)."""
    return list(matrix[-1]) if matrix else []


def final_mean(matrix: Matrix) -> float | None:
    """Mean of the non-null entries of the final row; ``None`` if there are none."""
    return _mean(final_row(matrix))


def forgetting(matrix: Matrix) -> float | None:
    """Average forgetting, the measure ``F_k`` of Chaudhry et al., "Riemannian Walk for Incremental
    Learning: Understanding Forgetting and Intransigence", ECCV 2018, taken at the last row.

    With T rows, for each task ``j`` in ``0..T-2``::

        f_j = max_{i in [j, T-2]} matrix[i][j] - matrix[T-1][j]

    i.e. the best value task j ever had before the final row (counting the row where j was learned)
    minus its final value; positive means the task got worse. Null entries are skipped inside the max;
    ``f_j`` is undefined when its final value or all its earlier values are null. The result is the mean
    of the defined ``f_j``, or ``None`` when T < 2 or no ``f_j`` is defined.
    """
    num_rows = len(matrix)
    if num_rows < 2:
        return None
    last = matrix[-1]
    drops: list[float | None] = []
    for j in range(num_rows - 1):
        earlier = [matrix[i][j] for i in range(j, num_rows - 1) if matrix[i][j] is not None]
        if earlier and last[j] is not None:
            drops.append(max(earlier) - last[j])
    return _mean(drops)


class AccuracyMatrix:
    """Accumulates one metric's accuracy matrix as tasks are learned and evaluated.

    The matrix is square, T x T, with T = 1 + the highest ``trained`` index recorded so far, so a run
    stopped early still summarises the tasks it learned. Entries never recorded are ``None``.
    """

    def __init__(self) -> None:
        self._values: dict[tuple[int, int], float | None] = {}
        self._num_rows = 0

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[float | None]]) -> AccuracyMatrix:
        """Rebuild from a stored ``matrix`` (e.g. results.json); entries with ``j > i`` must be null."""
        acc = cls()
        for i, row in enumerate(rows):
            for j, value in enumerate(row):
                if j > i:
                    if value is not None:
                        raise ValueError(f"matrix[{i}][{j}]: task {j} is not learned yet, expected null")
                    continue
                acc.record(i, j, value)
            acc._num_rows = max(acc._num_rows, i + 1)
        return acc

    def record(self, trained: int, evaluated: int, value: float | None) -> None:
        """Store the metric of task ``evaluated`` after training task ``trained`` (None/NaN = n/a)."""
        if not 0 <= evaluated <= trained:
            raise ValueError(f"need 0 <= evaluated <= trained, got trained={trained}, evaluated={evaluated}")
        self._values[(trained, evaluated)] = _clean(value, f"matrix[{trained}][{evaluated}]")
        self._num_rows = max(self._num_rows, trained + 1)

    def record_row(self, trained: int, values: Sequence[float | None]) -> None:
        """Store a whole row: ``values[j]`` for tasks ``j = 0..trained`` (``trained + 1`` values)."""
        if len(values) != trained + 1:
            raise ValueError(f"row {trained} needs {trained + 1} values, got {len(values)}")
        for j, value in enumerate(values):
            self.record(trained, j, value)

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks learned so far."""
        return self._num_rows

    @property
    def matrix(self) -> Matrix:
        """``T x T`` nested lists, ``None`` above the diagonal and where nothing was recorded."""
        size = self._num_rows
        return [[self._values.get((i, j)) for j in range(size)] for i in range(size)]

    def to_json(self) -> dict[str, object]:
        """``{"matrix": [[...]], "final": [...], "final_mean": x, "forgetting": x}``, nulls as None."""
        matrix = self.matrix
        return {
            "matrix": matrix,
            "final": final_row(matrix),
            "final_mean": final_mean(matrix),
            "forgetting": forgetting(matrix),
        }


def metrics_section(matrices: Mapping[str, AccuracyMatrix]) -> dict[str, dict[str, object]]:
    """The "metrics" section of results.json: ``{name: matrix.to_json()}``, standard names first."""
    ordered = [n for n in METRIC_NAMES if n in matrices] + [n for n in matrices if n not in METRIC_NAMES]
    return {name: matrices[name].to_json() for name in ordered}


def operating_points_section(points: Mapping[str, Mapping[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """The "operating_points" section of results.json: ``{task: {name: threshold | None}}``.

    Thresholds are on the score scale (any finite number); NaN becomes ``None``.
    """
    out: dict[str, dict[str, float | None]] = {}
    for task, named in points.items():
        out[task] = {}
        for name, value in named.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
                raise TypeError(f"operating point {task}.{name}: expected a number or None, got {type(value).__name__}")
            number = None if value is None or math.isnan(float(value)) else float(value)
            if number is not None and math.isinf(number):
                raise ValueError(f"operating point {task}.{name}: must be finite, got {number}")
            out[task][name] = number
    return out


def _check_routing(true_tasks: Sequence[int], routed_tasks: Sequence[int], num_tasks: int) -> None:
    """Raise unless both sequences have equal length and hold indices in ``[0, num_tasks)``."""
    if len(true_tasks) != len(routed_tasks):
        raise ValueError(f"got {len(true_tasks)} true tasks but {len(routed_tasks)} routed tasks")
    for name, seq in (("true", true_tasks), ("routed", routed_tasks)):
        bad = [t for t in seq if not 0 <= int(t) < num_tasks]
        if bad:
            raise ValueError(f"{name} task indices must lie in [0, {num_tasks}), got {bad[:5]}")


def routing_accuracy(true_tasks: Sequence[int], routed_tasks: Sequence[int]) -> float | None:
    """Fraction of images routed to their true task; ``None`` when there are no images."""
    if len(true_tasks) != len(routed_tasks):
        raise ValueError(f"got {len(true_tasks)} true tasks but {len(routed_tasks)} routed tasks")
    if len(true_tasks) == 0:
        return None
    hits = sum(int(t) == int(r) for t, r in zip(true_tasks, routed_tasks, strict=True))
    return hits / len(true_tasks)


def routing_confusion(true_tasks: Sequence[int], routed_tasks: Sequence[int], num_tasks: int) -> list[list[int]]:
    """``num_tasks x num_tasks`` counts: ``confusion[true][routed]`` (rows = true task)."""
    _check_routing(true_tasks, routed_tasks, num_tasks)
    confusion = [[0] * num_tasks for _ in range(num_tasks)]
    for t, r in zip(true_tasks, routed_tasks, strict=True):
        confusion[int(t)][int(r)] += 1
    return confusion


def routing_section(true_tasks: Sequence[int], routed_tasks: Sequence[int], num_tasks: int) -> dict[str, object]:
    """The "routing" section of results.json: ``{"accuracy": x | None, "confusion": [[...]]}``."""
    return {
        "accuracy": routing_accuracy(true_tasks, routed_tasks),
        "confusion": routing_confusion(true_tasks, routed_tasks, num_tasks),
    }
