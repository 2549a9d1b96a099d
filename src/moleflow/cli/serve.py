"""``moleflow serve RUN_DIR``: the inspection server and its web page (:mod:`moleflow.serve`)."""

from __future__ import annotations

import argparse


def add_parser(sub, common) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a run over HTTP: a web page, POST /predict, GET /tasks, /health, /metrics",
        description="Load RUN_DIR (read-only) and serve it: an operator's page at /, POST /predict (multipart "
        "images), GET /tasks, /health, /metrics. Concurrent requests are batched onto the model. "
        "Needs pip install 'moleflow[serve]'.",
    )
    s.add_argument("run_dir")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the run's config)")
    s.add_argument("--max-batch", type=int, default=16, help="images per model call (default 16)")
    s.add_argument("--max-wait-ms", type=float, default=10.0, help="wait for more images to batch (default 10)")
    s.add_argument("--queue-size", type=int, default=64, help="images waiting for the model before 503 (default 64)")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait before 504 (default 60)")
    s.add_argument("--max-images", type=int, default=16, help="images per request (default 16)")
    s.add_argument("--max-upload-mb", type=float, default=64.0, help="request body size in MiB (default 64)")
    s.add_argument("--max-megapixels", type=float, help="pixels an image may have (default 50)")
    s.add_argument("--max-connections", type=int, default=64, help="connections at once before 503 (default 64)")
    s.add_argument("--no-warmup", action="store_true", help="do not run one image through the model at start")
    common(s)
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from moleflow.extras import require_extra

    require_extra("serve", "moleflow serve")
    from moleflow.serve import ServeSettings, serve

    settings = ServeSettings(
        host=args.host,
        port=args.port,
        device=args.device,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        request_timeout_s=args.timeout,
        max_images=args.max_images,
        max_upload_mb=args.max_upload_mb,
        max_megapixels=args.max_megapixels,
        max_connections=args.max_connections,
        warmup=not args.no_warmup,
    )
    return serve(args.run_dir, settings)
