"""The web application: ``POST /predict``, ``GET /tasks``, ``GET /health``, ``GET /metrics`` and the
operator's page at ``/`` (static HTML and JavaScript, no build step).

``POST /predict`` takes a multipart form with one file field per image (any field name) and answers
``{"results": [...]}`` in upload order, one object per image: the routed product (``routed``: the
product's name or ``"unknown product"``), raw ``score`` and ``normalized_score`` (0 = a typical normal,
1 = the threshold), ``threshold``, ``verdict``, routing distance and threshold, defect pixels and sizes.
``?heatmap=base64`` adds each image's heatmap PNG (:mod:`moleflow.serve.heatmap`) as ``heatmap_png``;
``?heatmap=png`` answers one image with the PNG itself and the verdict in ``X-Moleflow-*`` headers.

Status codes: 400 corrupt image or malformed form, 413 too large (body, image count or pixels), 415 no
image or no multipart form, 503 queue full (retry after a second), 504 request timeout, 500 model failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from moleflow.serve.batcher import QueueFullError, ShuttingDownError
from moleflow.serve.metrics import MetricsMiddleware
from moleflow.serve.service import InspectionService, RequestTimeoutError, load_detector
from moleflow.serve.settings import ServeSettings
from moleflow.serve.uploads import (
    BodyLimitMiddleware,
    UploadTooLargeError,
    decode_uploads,
    read_uploads,
    too_large_response,
)

__all__ = ["build_app", "create_app"]

log = logging.getLogger("moleflow.serve")
STATIC = Path(__file__).with_name("static")
BUSY = {"Retry-After": "1"}


def create_app(run_dir: str | os.PathLike[str], settings: ServeSettings | None = None) -> FastAPI:
    """The application serving the run in ``run_dir``; the run is loaded (and checked) now, so a run that
    fails its checks raises here, before any port is opened. Start/stop happen in the app's lifespan."""
    settings = settings or ServeSettings()
    return build_app(InspectionService(load_detector(run_dir, settings), settings))


def build_app(service: InspectionService) -> FastAPI:
    """The application around an :class:`InspectionService` (tests build several around one detector)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        log.info("serving %s: products %s", service.run_path, service.detector.products)
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="moleflow inspection server", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service = service
    app.add_middleware(BodyLimitMiddleware, max_bytes=service.settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)  # outermost: sees every answer, 413s included
    app.add_exception_handler(UploadTooLargeError, lambda request, exc: too_large_response(exc))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _routes(app, service)
    return app


def _routes(app: FastAPI, service: InspectionService) -> None:
    settings = service.settings

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> JSONResponse:
        body = service.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/tasks")
    async def tasks() -> dict:
        return {"products": service.tasks()}

    @app.get("/metrics")
    async def metrics() -> dict:
        return service.metrics_snapshot()

    @app.post("/predict")
    async def predict(request: Request, heatmap: Literal["none", "base64", "png"] = "none") -> Response:
        deadline = time.monotonic() + settings.request_timeout_s
        if service.batcher.stats().depth >= settings.queue_size:  # refuse before reading and decoding the body
            raise HTTPException(503, f"the server is busy: the queue is full ({settings.queue_size} images)", headers=BUSY)
        uploads = await read_uploads(request, settings)
        if heatmap == "png" and len(uploads) != 1:
            raise HTTPException(400, f"heatmap=png answers one image with its PNG; got {len(uploads)}: use heatmap=base64")
        async with service.decode_slots:
            images = await run_in_threadpool(decode_uploads, uploads, settings)
        try:
            predictions = await service.infer(images, deadline)
        except QueueFullError as e:
            raise HTTPException(503, f"the server is busy: {e}", headers=BUSY) from e
        except ShuttingDownError as e:
            raise HTTPException(503, str(e)) from e
        except RequestTimeoutError as e:
            raise HTTPException(504, str(e)) from e
        except Exception as e:  # the model call failed (logged by the worker with its traceback)
            raise HTTPException(500, f"the model failed on this request's batch: {type(e).__name__}: {e}") from e
        service.metrics.add_images(len(images))
        if heatmap == "png":
            (prediction,) = predictions
            png = await run_in_threadpool(service.heatmap, images[0], prediction)
            return Response(png, media_type="image/png", headers=_summary_headers(prediction))
        results = await run_in_threadpool(
            lambda: [
                service.result(u.name, image, p, heatmap == "base64")
                for u, image, p in zip(uploads, images, predictions, strict=True)
            ]
        )
        return JSONResponse({"results": results})


def _summary_headers(prediction) -> dict[str, str]:
    return {
        "X-Moleflow-Verdict": prediction.verdict,
        "X-Moleflow-Product": "unknown product" if prediction.unknown else prediction.product,
        "X-Moleflow-Score": repr(prediction.score),
        "X-Moleflow-Normalized-Score": repr(prediction.normalized_score),
        "X-Moleflow-Threshold": repr(prediction.threshold),
    }
