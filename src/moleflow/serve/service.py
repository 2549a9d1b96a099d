"""The model behind the endpoints: a loaded :class:`~moleflow.detector.Detector`, its micro-batcher, and
what the answers are made of (product records, per-image results, heatmaps).

The detector is loaded once, read-only (``Detector.load`` checks every file and never writes), and used
only by the batcher's worker thread; request handlers decode images and render heatmaps on the web
server's thread pool, so those run beside the model instead of in its way.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import resource
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from moleflow import __version__
from moleflow.detector import Detector, DetectorError
from moleflow.prediction import Prediction
from moleflow.serve.batcher import MicroBatcher
from moleflow.serve.heatmap import heatmap_overlay, png_bytes
from moleflow.serve.metrics import Metrics
from moleflow.serve.settings import ServeSettings

__all__ = ["ROUTES", "InspectionService", "RequestTimeoutError", "load_detector"]

log = logging.getLogger("moleflow.serve")
ROUTES = ("/", "/predict", "/tasks", "/health", "/metrics")


class RequestTimeoutError(RuntimeError):
    """A request's images were not through the model before its deadline."""


def load_detector(run_dir: str | os.PathLike[str], settings: ServeSettings) -> Detector:
    """The run's detector, every file checked; DetectorError for a run with nothing to serve."""
    options: dict[str, Any] = {"progress": False} | ({"device": settings.device} if settings.device else {})
    detector = Detector.load(run_dir, **options)
    if not detector.products:
        raise DetectorError(f"run {run_dir} has no products yet; learn one first (moleflow learn {run_dir} NAME=SOURCE)")
    if settings.compile_backbone:
        detector.extractor.compile_backbone()
    return detector


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class InspectionService:
    """See the module docstring. :meth:`start` before the first request, :meth:`stop` after the last."""

    def __init__(self, detector: Detector, settings: ServeSettings) -> None:
        self.detector = detector
        self.settings = settings
        self.metrics = Metrics(ROUTES)
        self.decode_slots = asyncio.Semaphore(settings.decoders)  # decoded images take memory: a few at a time
        self.batcher: MicroBatcher[np.ndarray, Prediction] = MicroBatcher(
            self._predict,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1e3,
            capacity=settings.queue_size,
        )

    @property
    def run_path(self) -> Path | None:
        return self.detector.run.path if self.detector.run is not None else None

    def _predict(self, images: list[np.ndarray]) -> list[Prediction]:
        return self.detector.predict(images, batch_size=self.settings.max_batch, max_map_side=self.settings.max_side)

    def start(self) -> None:
        if self.settings.warmup:  # builds the backbone and runs it once: the first request is not the slow one
            start = time.perf_counter()
            size = self.detector.cfg.model.backbone.image_size
            if self.detector.extractor.backbone_compiled:  # every shape a batch can bring, compiled before requests
                self.detector.extractor.warm_up(self.settings.max_batch)
            self._predict([np.zeros((size, size, 3), np.uint8)])
            log.info("model warmed up in %.1f s", time.perf_counter() - start)
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    # ------------------------------------------------------------------ predictions

    async def infer(self, images: list[np.ndarray], deadline: float) -> list[Prediction]:
        """Predictions of ``images`` through the batcher; QueueFullError, RequestTimeoutError at ``deadline``
        (a ``time.monotonic()`` value; the request's images are then dropped from the queue)."""
        futures: list[Future[Prediction]] = self.batcher.submit(images)
        try:
            return list(
                await asyncio.wait_for(
                    asyncio.gather(*(asyncio.wrap_future(f) for f in futures)), max(0.0, deadline - time.monotonic())
                )
            )
        except asyncio.TimeoutError as e:
            raise RequestTimeoutError(
                f"no answer within the request timeout of {self.settings.request_timeout_s:g} s; the server is "
                "overloaded, retry later or send fewer images per request"
            ) from e
        finally:
            for future in futures:
                future.cancel()  # no-op for those done or running; drops the waiting ones

    def result(self, name: str, image: np.ndarray, prediction: Prediction, heatmap: bool) -> dict[str, Any]:
        """The JSON answer for one image (``Prediction.to_json`` named by the upload), with the heatmap PNG
        as base64 when asked."""
        out = {**prediction.to_json(), "image": name}
        out["routed"] = "unknown product" if prediction.unknown else prediction.product
        if heatmap:
            out["heatmap_png"] = base64.b64encode(self.heatmap(image, prediction)).decode("ascii")
        return out

    def heatmap(self, image: np.ndarray, prediction: Prediction) -> bytes:
        return png_bytes(heatmap_overlay(image, prediction, self.detector.records[prediction.product].calibration))

    # ------------------------------------------------------------------ descriptions

    def tasks(self) -> list[dict[str, Any]]:
        """One row per product: when learned, from what, on how many images, its thresholds."""
        rows = []
        for record in self.detector.tasks():
            cal = record.calibration
            rows.append(
                {
                    "name": record.name,
                    "learned_at": record.learned_at,
                    "source": record.source,
                    "train_images": record.train_images,
                    "image_threshold": cal.image_threshold,
                    "image_fpr": cal.image_fpr,
                    "image_rule": cal.image_rule,
                    "pixel_threshold": cal.pixel_threshold,
                    "unknown_threshold": cal.unknown_threshold,
                    "calibration": {"method": cal.method, "images": cal.images},
                }
            )
        return rows

    def health(self) -> dict[str, Any]:
        stats = self.batcher.stats()
        return {
            "status": "ok" if self.batcher.alive else "stopped",
            "moleflow": __version__,
            "preset": self.detector.cfg.preset,
            "device": str(self.detector.device),
            "products": self.detector.products,
            "queue": {"depth": stats.depth, "capacity": stats.capacity},
            "limits": self.settings.limits(),
        }

    def metrics_snapshot(self) -> dict[str, Any]:
        stats = self.batcher.stats()
        return {
            **self.metrics.snapshot(),
            "model": {
                "calls": stats.calls,
                "images": stats.items,
                "mean_batch": stats.mean_batch,
                "max_batch": stats.max_batch_seen,
                "cancelled_images": stats.cancelled,
                "failed_calls": stats.failed_calls,
                "busy_s": stats.busy_s,
            },
            "queue": {"depth": stats.depth, "capacity": stats.capacity},
            "memory": {"peak_rss_mib": peak_rss_mib()},
        }
