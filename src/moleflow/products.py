"""The product-level view shared by the torch :class:`~moleflow.detector.Detector` and the onnxruntime
:class:`~moleflow.deploy.runtime.OnnxDetector`: both hold ``records``, one
:class:`~moleflow.rundir.TaskRecord` per product in the router's order."""

from __future__ import annotations

from moleflow.rundir import TaskRecord


class ProductRecords:
    """Mixin: ``products``, ``tasks()``, ``name in detector`` and ``len(detector)`` from ``self.records``."""

    records: dict[str, TaskRecord]

    @property
    def products(self) -> list[str]:
        """Product names in the router's order."""
        return list(self.records)

    def tasks(self) -> list[TaskRecord]:
        """One record per product: name, images learned, when, source, seed, calibration."""
        return list(self.records.values())

    def __contains__(self, name: object) -> bool:
        return name in self.records

    def __len__(self) -> int:
        return len(self.records)
