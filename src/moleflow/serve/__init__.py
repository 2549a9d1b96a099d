"""An inspection server for a trained run: FastAPI + uvicorn (``pip install 'moleflow[serve]'``).

    moleflow serve runs/plant                      # http://127.0.0.1:8000/ : the operator's page
    curl -F image=@part.png http://127.0.0.1:8000/predict

    from moleflow.serve import ServeSettings, create_app
    app = create_app("runs/plant", ServeSettings(max_batch=32))   # an ASGI app, for any ASGI server

Modules: :mod:`~moleflow.serve.app` (endpoints), :mod:`~moleflow.serve.service` (the detector behind
them), :mod:`~moleflow.serve.batcher` (micro-batching of concurrent requests onto the model),
:mod:`~moleflow.serve.uploads` (bounds and decoding), :mod:`~moleflow.serve.heatmap`,
:mod:`~moleflow.serve.metrics`, :mod:`~moleflow.serve.settings`; the page lives in ``static/``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any

from moleflow.serve.settings import ServeSettings, ServeSettingsError

__all__ = ["ServeSettings", "ServeSettingsError", "build_app", "create_app", "serve"]

log = logging.getLogger("moleflow.serve")


def __getattr__(name: str) -> Any:
    # the app needs FastAPI and torch: imported on first use, so the settings and the batcher are light
    if name in ("build_app", "create_app"):
        from moleflow.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(run_dir: str | os.PathLike[str], settings: ServeSettings | None = None) -> int:
    """Load the run, then serve it with uvicorn until interrupted (Ctrl-C / SIGTERM); returns 0."""
    import uvicorn

    from moleflow.serve.app import create_app

    settings = settings or ServeSettings()
    app = create_app(run_dir, settings)  # a run that fails its checks stops here, before the port opens
    if not _is_loopback(settings.host):
        log.warning("listening on %s: anyone who reaches this address can use the server (there is no login)", settings.host)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=10,
    )
    return 0
