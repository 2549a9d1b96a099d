"""The onnxruntime detector: a run's export, predicted with numpy, Pillow and onnxruntime only.

:class:`OnnxDetector` answers ``predict`` / ``iter_predict`` with the same :class:`~moleflow.prediction.Prediction`
results as :class:`moleflow.detector.Detector` on the run it was exported from (routing, unknown-product
rejection, raw and normalised score, verdict, anomaly map at input resolution, defect mask), up to float
rounding (tests/test_onnx_export.py measures it). It imports neither torch nor timm, so a line PC needs
``pip install onnxruntime numpy pillow`` and moleflow's pure-Python modules, not a deep-learning stack.

    det = OnnxDetector.load("exports/plant")        # or Detector.load("exports/plant")
    for p in det.predict(["part1.png", "part2.png"]):
        print(p.product, p.verdict, p.normalized_score)

Per batch: preprocessing (:func:`~moleflow.deploy.arrays.image_batch`), the backbone graph, the router
graph against every product's prototype, each routed group through its product's head, then image scores
and anomaly maps in numpy (:mod:`moleflow.deploy.arrays`). Every file is checked against the manifest's
hashes on load; a product's head session is opened on first use.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from moleflow.deploy.arrays import MapOperator, image_batch, image_scores
from moleflow.deploy.manifest import ExportError, FileEntry, Manifest
from moleflow.maps import MAX_MAP_SIDE, map_shape, resize_map
from moleflow.prediction import Prediction, input_batches, make_prediction
from moleflow.products import ProductRecords
from moleflow.rundir import TaskRecord

__all__ = ["DEFAULT_BATCH", "OnnxDetector"]

DEFAULT_BATCH = 16


def _providers(device: str | None) -> list[str]:
    import onnxruntime as ort

    name = str(device or "cpu")
    if name in ("cpu", "auto"):
        return ["CPUExecutionProvider"]
    if name.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ExportError(f"device {name!r} needs onnxruntime-gpu (CUDAExecutionProvider); use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ExportError(f"unknown device {name!r} for the onnx runtime; use cpu or cuda")


class OnnxDetector(ProductRecords):
    """The products of an export directory; build one with :meth:`load` (module docstring)."""

    def __init__(self, root: Path, manifest: Manifest, *, device: str | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.root, self.manifest = root, manifest
        self.records: dict[str, TaskRecord] = {p.name: TaskRecord.from_json(p.record) for p in manifest.products}
        self._options = ort.SessionOptions()
        if threads:
            self._options.intra_op_num_threads = threads
        self._providers = _providers(device)
        for entry in manifest.files():  # every file, heads included, before anything is used
            entry.check(root)
        self._backbone = self._session(manifest.backbone_graph)
        self._router = self._session(manifest.router_graph)
        self._heads: dict[str, Any] = {}
        means, precisions = [], []
        for product in manifest.products:
            with np.load(root / product.prototype.file) as data:
                means.append(data["mean"])
                precisions.append(data["precision"])
        self._means = np.stack(means).astype(np.float64)  # (T, G)
        if manifest.router["metric"] == "euclidean":
            precisions = [np.eye(self._means.shape[1])] * len(precisions)
        self._precisions = np.stack(precisions).astype(np.float64)  # (T, G, G)
        # router.covariance=pooled (older manifests: own): the route under the inverse of the mean covariance,
        # the reported distance (unknown products) under the routed product's own precision, as moleflow.routing
        self._route_precisions = self._precisions
        if manifest.router.get("covariance", "own") == "pooled":
            pooled = np.linalg.inv(np.linalg.inv(self._precisions).mean(axis=0))
            self._route_precisions = np.broadcast_to(0.5 * (pooled + pooled.T), self._precisions.shape).copy()
        pre, scoring = manifest.preprocessing, manifest.scoring
        self.image_size = int(pre["image_size"])
        self._maps = MapOperator(tuple(manifest.backbone["grid"]), self.image_size, float(scoring["smoothing_sigma"]))

    @classmethod
    def load(
        cls,
        export_dir: str | os.PathLike[str],
        *,
        device: str | None = None,
        threads: int | None = None,
        **ignored: Any,
    ) -> OnnxDetector:
        """The detector exported to ``export_dir``; every file is checked against the manifest's hashes.

        ``device``: ``cpu`` (default) or ``cuda`` (needs onnxruntime-gpu); ``threads``: onnxruntime's
        intra-op threads (default: its own choice). Other options of :meth:`Detector.load` (``progress``,
        ``check_calibration``...) are accepted and have nothing to do here: the export was checked when made.
        """
        import importlib.util

        from moleflow.extras import MissingExtraError

        if importlib.util.find_spec("onnxruntime") is None:  # the runtime needs it alone, not onnx itself
            raise MissingExtraError("predicting an export needs onnxruntime: pip install onnxruntime (or 'moleflow[onnx]')")
        root = Path(export_dir)
        manifest = Manifest.read(root)
        if not manifest.products:
            raise ExportError(f"{root} exports no products; learn one and export again")
        return cls(root, manifest, device=device, threads=threads)

    def _session(self, entry: FileEntry):
        import onnxruntime as ort

        path = self.root / entry.file
        return ort.InferenceSession(str(path), sess_options=self._options, providers=self._providers)

    def _head(self, name: str):
        if name not in self._heads:
            product = next(p for p in self.manifest.products if p.name == name)
            self._heads[name] = self._session(product.head)
        return self._heads[name]

    # ------------------------------------------------------------------ what it holds

    def __repr__(self) -> str:
        return f"OnnxDetector(products={self.products}, export={str(self.root)!r})"

    # ------------------------------------------------------------------ prediction

    def features(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        """RGB uint8 images -> the backbone graph's outputs (``patches (B, h, w, D)``, ``routing (B, G)``...)."""
        pre = self.manifest.preprocessing
        batch = image_batch(images, self.image_size, pre["mean"], pre["std"])
        names = self.manifest.backbone["outputs"]
        return dict(zip(names, self._backbone.run(names, {"images": batch}), strict=True))

    def route(self, routing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(product index (B,), squared distance (B,) float64)`` of the nearest prototype per image."""
        feeds = {"features": routing.astype(np.float64), "means": self._means, "precisions": self._precisions}
        (distances,) = self._router.run(["distances"], feeds)
        if self._route_precisions is self._precisions:
            index = distances.argmin(axis=1)
        else:
            (routing_distances,) = self._router.run(["distances"], {**feeds, "precisions": self._route_precisions})
            index = routing_distances.argmin(axis=1)
        return index, distances[np.arange(len(index)), index]

    def score(self, feats: dict[str, np.ndarray], index: np.ndarray) -> np.ndarray:
        """Patch scores ``(B, h, w)`` float32, each image under the product ``index`` routed it to."""
        scores = np.empty(feats["patches"].shape[:3], dtype=np.float32)
        inputs = ["patches"] + (["context"] if "context" in feats else [])
        for t in np.unique(index):
            rows = np.flatnonzero(index == t)
            (scores[rows],) = self._head(self.products[t]).run(["scores"], {k: feats[k][rows] for k in inputs})
        if not np.isfinite(scores).all():
            raise FloatingPointError("non-finite anomaly scores: the input images gave NaN/inf features")
        return scores

    def predict(self, images: Any, *, batch_size: int | None = None, max_map_side: int = MAX_MAP_SIDE) -> list[Prediction]:
        """Route, score and judge every image (inputs as :meth:`moleflow.detector.Detector.predict`)."""
        return list(self.iter_predict(images, batch_size=batch_size, max_map_side=max_map_side))

    def iter_predict(
        self, images: Any, *, batch_size: int | None = None, max_map_side: int = MAX_MAP_SIDE
    ) -> Iterator[Prediction]:
        """:meth:`predict` one batch at a time, for long streams of images."""
        batch_size = batch_size or DEFAULT_BATCH
        for chunk in input_batches(images, batch_size):
            yield from self._predict_batch(chunk, max_map_side)

    def _predict_batch(self, chunk: list[tuple[np.ndarray, str]], max_map_side: int) -> list[Prediction]:
        feats = self.features([image for image, _ in chunk])
        index, distances = self.route(feats["routing"])
        scores = self.score(feats, index)
        scoring = self.manifest.scoring
        image_score = image_scores(scores, scoring["aggregation"], int(scoring["top_k"]))
        maps = self._maps(scores)
        out = []
        for i, (image, label) in enumerate(chunk):
            product = self.products[int(index[i])]
            amap = resize_map(maps[i], map_shape(image.shape[:2], max_map_side))
            cal = self.records[product].calibration
            score = float(cal.image_scores(image_score[i], distances[i]))  # mixed with the distance if so calibrated
            out.append(make_prediction(label, image.shape[:2], product, cal, score, float(distances[i]), amap))
        return out
