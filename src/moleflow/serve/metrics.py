"""Request counters and latency percentiles for ``GET /metrics``, kept by an ASGI middleware.

Latencies are those of ``POST /predict`` (from the first byte of the request to the last of the answer,
measured in the server), over the last :data:`WINDOW` requests, so the percentiles follow the current
load and memory stays bounded. Counts are since start, per route and status class.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

import numpy as np

__all__ = ["WINDOW", "Metrics", "MetricsMiddleware"]

WINDOW = 10_000
PERCENTILES = (50, 95, 99)


class Metrics:
    """Thread-safe counters (the middleware runs on the event loop, the tests read from other threads)."""

    def __init__(self, routes: tuple[str, ...]) -> None:
        self.routes = routes
        self.started = time.time()
        self._lock = threading.Lock()
        self._statuses: Counter[tuple[str, int]] = Counter()
        self._latencies: deque[float] = deque(maxlen=WINDOW)
        self._images = 0

    def route_of(self, path: str) -> str:
        return path if path in self.routes else "other"

    def record(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._statuses[(route, status)] += 1
            if route == "/predict" and status == 200:
                self._latencies.append(seconds)

    def add_images(self, n: int) -> None:
        with self._lock:
            self._images += n

    def snapshot(self) -> dict[str, Any]:
        """``requests`` (total, by route, by status), ``errors`` (4xx, 5xx, refused 503, timed out 504),
        ``predict_latency_ms`` (count, mean, p50, p95, p99, max over the window), ``images``, ``uptime_s``."""
        with self._lock:
            statuses = dict(self._statuses)
            latencies = np.asarray(self._latencies, dtype=np.float64) * 1e3
            images = self._images
        by_route: Counter[str] = Counter()
        by_status: Counter[str] = Counter()
        for (route, status), n in statuses.items():
            by_route[route] += n
            by_status[str(status)] += n
        latency: dict[str, float | int | None] = {"count": int(latencies.size), "window": WINDOW}
        for p in PERCENTILES:
            latency[f"p{p}"] = float(np.percentile(latencies, p)) if latencies.size else None
        latency["mean"] = float(latencies.mean()) if latencies.size else None
        latency["max"] = float(latencies.max()) if latencies.size else None
        return {
            "uptime_s": time.time() - self.started,
            "requests": {"total": sum(statuses.values()), "by_route": dict(by_route), "by_status": dict(by_status)},
            "errors": {
                "client": sum(n for (_, s), n in statuses.items() if 400 <= s < 500),
                "server": sum(n for (_, s), n in statuses.items() if s >= 500),
                "refused_queue_full": sum(n for (_, s), n in statuses.items() if s == 503),
                "timed_out": sum(n for (_, s), n in statuses.items() if s == 504),
            },
            "predict_latency_ms": latency,
            "images": images,
        }


class MetricsMiddleware:
    """Pure ASGI middleware: the status and duration of every HTTP request go to :class:`Metrics`."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception before the response started

        async def watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.record(self.metrics.route_of(scope["path"]), status, time.perf_counter() - start)
