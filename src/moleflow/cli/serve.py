"""``moleflow serve RUN_DIR``: the inspection server and its web page (:mod:`moleflow.serve`)."""

from __future__ import annotations

import argparse


def add_parser(sub, common) -> None:
    from moleflow.serve.settings import ServeSettings  # light: no FastAPI, no torch

    d = ServeSettings()
    s = sub.add_parser(
        "serve",
        help="serve a run over HTTP: a web page, POST /predict, GET /tasks, /health, /metrics",
        description="Load RUN_DIR (read-only) and serve it: an operator's page at /, POST /predict (multipart "
        "images), GET /tasks, /health, /metrics. Concurrent requests are batched onto the model. "
        "Needs pip install 'moleflow[serve]'.",
    )
    s.add_argument("run_dir")
    s.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host}: this machine only)")
    s.add_argument("--port", type=int, default=d.port, help=f"default {d.port}")
    s.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the run's config)")
    s.add_argument("--max-batch", type=int, default=d.max_batch, help=f"images per model call (default {d.max_batch})")
    s.add_argument(
        "--max-wait-ms", type=float, default=d.max_wait_ms, help=f"wait for more images to batch (default {d.max_wait_ms:g})"
    )
    s.add_argument(
        "--queue-size",
        type=int,
        default=d.queue_size,
        help=f"images waiting for the model before 503 (default {d.queue_size})",
    )
    s.add_argument(
        "--timeout",
        type=float,
        default=d.request_timeout_s,
        help=f"seconds a request may take before 504 (default {d.request_timeout_s:g})",
    )
    s.add_argument("--max-images", type=int, default=d.max_images, help=f"images per request (default {d.max_images})")
    s.add_argument(
        "--max-upload-mb",
        type=float,
        default=d.max_upload_mb,
        help=f"request body size in MiB (default {d.max_upload_mb:g})",
    )
    s.add_argument(
        "--max-megapixels", type=float, help="pixels an image may have (default 50, MOLEFLOW_MAX_IMAGE_MEGAPIXELS)"
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help=f"connections at once before 503 (default {d.max_connections})",
    )
    s.add_argument("--no-warmup", action="store_true", help="do not run one image through the model at start")
    s.add_argument(
        "--compile",
        action="store_true",
        help="run the backbone under torch.compile: same features, faster per image; the warm-up compiles it "
        "(seconds to a minute)",
    )
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
        compile_backbone=args.compile,
    )
    return serve(args.run_dir, settings)
