"""``results.json`` kept across commands (DESIGN.md schema; keys are only ever added).

The accuracy matrices are indexed by the products in learning order: ``matrix[i][j]`` is product ``j``'s
metric after product ``i`` was learned. A command that learns a product adds its row and fills what it
evaluated (``moleflow learn --eval all`` / the protocol fill the whole row, ``--eval new`` only the new
product's entry); ``moleflow eval`` rewrites the last row; forgetting a product deletes its row and
column. Entries not evaluated are null, as are metrics that do not apply (pixel metrics without masks).

Beyond the schema: per product, its calibration and what the thresholds gave on its test set
(``calibration``), and routing counts including images rejected as unknown products (``routing``).
"""

from __future__ import annotations

import datetime
import platform
from collections.abc import Mapping, Sequence
from typing import Any

from moleflow import __version__
from moleflow.evaluation.evaluate import METRICS, ProductEvaluation
from moleflow.evaluation.protocol import _clean, final_mean, final_row, forgetting, operating_points_section
from moleflow.prediction import UNKNOWN

__all__ = ["MODES", "ResultsBook"]

MODES = {"routed": "metrics", "oracle": "metrics_oracle"}
Matrix = list[list[float | None]]


class ResultsBook:
    """The evaluation state of a run (module docstring); ``to_json`` gives results.json."""

    def __init__(self, tasks: Sequence[str] = ()) -> None:
        self.tasks: list[str] = list(tasks)
        self.matrices: dict[str, dict[str, Matrix]] = {
            mode: {m: [[None] * len(self.tasks) for _ in self.tasks] for m in METRICS} for mode in MODES
        }
        self.tests: dict[str, dict[str, Any]] = {}  # product -> verdict summary of its last evaluation
        self.routed_to: dict[str, dict[str, int]] = {}  # true product -> {nearest product: images}
        self.rejected: dict[str, int] = {}  # true product -> images rejected as unknown products
        self.operating_points: dict[str, dict[str, float | None]] = {}
        self.inference_ms_per_image: float | None = None

    # ------------------------------------------------------------------ structure

    @classmethod
    def from_json(cls, results: Mapping[str, Any] | None, products: Sequence[str]) -> ResultsBook:
        """The stored results reconciled with the run's ``products``: entries of products the run no longer
        holds are dropped; a stored file that disagrees in any other way starts a fresh book."""
        if not results or not isinstance(results.get("tasks"), list):
            return cls(products)
        book = cls(results["tasks"])
        try:
            for mode, key in MODES.items():
                for m in METRICS:
                    stored = results.get(key, {}).get(m, {}).get("matrix")
                    if stored is not None:
                        book.matrices[mode][m] = [[_clean(v, f"{key}.{m}") for v in row] for row in stored]
                        _check_square(book.matrices[mode][m], len(book.tasks))
        except (TypeError, ValueError, AttributeError):
            return cls(products)
        book.tests = {k: dict(v["test"]) for k, v in (results.get("calibration") or {}).items() if v.get("test")}
        routing = results.get("routing") or {}
        book.routed_to = {k: dict(v) for k, v in (routing.get("routed_to") or {}).items()}
        book.rejected = dict(routing.get("rejected_as_unknown") or {})
        book.operating_points = {k: dict(v) for k, v in (results.get("operating_points") or {}).items()}
        book.inference_ms_per_image = (results.get("timing") or {}).get("inference_ms_per_image")
        for name in [t for t in book.tasks if t not in products]:
            book.drop(name)
        if book.tasks != list(products):
            return cls(products)
        return book

    def learned(self, name: str) -> None:
        """A new row for product ``name`` (appended last; a relearned product moves to the end)."""
        if name in self.tasks:
            self.drop(name)
        self.tasks.append(name)
        for mode in MODES:
            for m in METRICS:
                matrix = self.matrices[mode][m]
                for row in matrix:
                    row.append(None)
                matrix.append([None] * len(self.tasks))

    def drop(self, name: str) -> None:
        """Forget product ``name``: its row, its column, its test summary and routing counts."""
        j = self.tasks.index(name)
        del self.tasks[j]
        for mode in MODES:
            for m in METRICS:
                matrix = self.matrices[mode][m]
                del matrix[j]
                for row in matrix:
                    del row[j]
        self.tests.pop(name, None)
        self.routed_to.pop(name, None)
        self.rejected.pop(name, None)
        self.operating_points.pop(name, None)
        for counts in self.routed_to.values():
            counts.pop(name, None)

    def record(self, evaluation: ProductEvaluation, router_tasks: Sequence[str]) -> None:
        """Store ``evaluation`` in the last row (the state after the last product was learned)."""
        if not self.tasks:
            raise ValueError("no product has been learned yet")
        j, last = self.tasks.index(evaluation.name), len(self.tasks) - 1
        for mode, values in (("routed", evaluation.routed), ("oracle", evaluation.oracle)):
            for m in METRICS:
                if values is not None:
                    self.matrices[mode][m][last][j] = _clean(values.get(m), f"{mode}.{m}")
        self.tests[evaluation.name] = {**evaluation.summary, "evaluated_at": _now()}
        counts: dict[str, int] = {}
        for index in evaluation.scored.task_index.tolist():
            counts[router_tasks[index]] = counts.get(router_tasks[index], 0) + 1
        self.routed_to[evaluation.name] = counts
        self.rejected[evaluation.name] = sum(v == UNKNOWN for v in evaluation.verdicts)
        self.operating_points[evaluation.name] = dict(evaluation.operating_points)

    # ------------------------------------------------------------------ results.json

    def routing(self) -> dict[str, Any]:
        """Confusion over the products (rows true, columns the nearest product, whether or not the image was
        then rejected as unknown), its accuracy, and the known images rejected as unknown products."""
        n = len(self.tasks)
        confusion = [[0] * n for _ in range(n)]
        for i, true in enumerate(self.tasks):
            for routed, count in self.routed_to.get(true, {}).items():
                if routed in self.tasks:
                    confusion[i][self.tasks.index(routed)] += count
        total = sum(map(sum, confusion))
        rejected = sum(self.rejected.get(t, 0) for t in self.tasks)
        return {
            "accuracy": sum(confusion[i][i] for i in range(n)) / total if total else None,
            "confusion": confusion,
            "rejected_as_unknown": {t: self.rejected[t] for t in self.tasks if t in self.rejected},
            "rejected_as_unknown_rate": rejected / total if total else None,
            "routed_to": self.routed_to,
        }

    def to_json(self, detector, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """results.json for ``detector`` (whose products must be this book's)."""
        if detector.products != self.tasks:
            raise ValueError(f"results cover {self.tasks} but the detector holds {detector.products}")
        records = detector.records
        out: dict[str, Any] = {"tasks": list(self.tasks)}
        for mode, key in MODES.items():
            out[key] = {m: _matrix_json(self.matrices[mode][m]) for m in METRICS}
        out["routing"] = self.routing()
        out["operating_points"] = operating_points_section({n: self.operating_points.get(n, {}) for n in self.tasks})
        out["thresholds"] = {n: records[n].calibration.image_threshold for n in self.tasks}
        out["calibration"] = {n: {**records[n].calibration.summary(), "test": self.tests.get(n)} for n in self.tasks}
        out["timing"] = {
            "feature_seconds": [records[n].seconds.get("features") for n in self.tasks],
            "train_seconds": [records[n].seconds.get("train") for n in self.tasks],
            "calibration_seconds": [records[n].seconds.get("calibration") for n in self.tasks],
            "inference_ms_per_image": self.inference_ms_per_image,
        }
        counts = detector.model.parameter_counts()
        backbone = sum(p.numel() for p in detector.extractor.parameters())
        out["params"] = {
            "backbone": backbone,
            "base": counts["base"],
            "per_task": [counts["per_task"][t] for t in self.tasks],
        }
        out["environment"] = _environment(detector)
        out.update(extra or {})
        return out


def _matrix_json(matrix: Matrix) -> dict[str, Any]:
    return {"matrix": matrix, "final": final_row(matrix), "final_mean": final_mean(matrix), "forgetting": forgetting(matrix)}


def _check_square(matrix: Matrix, n: int) -> None:
    if len(matrix) != n or any(len(row) != n for row in matrix):
        raise ValueError(f"matrix is not {n} x {n}")


def _environment(detector) -> dict[str, Any]:
    import torch

    device = detector.device
    described = (
        str(device)
        if device.type != "cpu"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    return {"device": described, "torch": torch.__version__, "moleflow": __version__, "preset": detector.cfg.preset}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
