"""What a server may take and how it batches: :class:`ServeSettings` (checked on construction)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["ServeSettings", "ServeSettingsError"]

MIB = 1024 * 1024


class ServeSettingsError(ValueError):
    """A server setting out of range; the message names it and says what is allowed."""


@dataclass(frozen=True)
class ServeSettings:
    """Bounds and batching of :func:`moleflow.serve.create_app`.

    ``max_batch``: images per model call; ``max_wait_ms``: how long the model worker waits for more images
    after the first one of a batch arrives (latency added to a lone request, at most); ``queue_size``:
    images waiting for the model, beyond which a request gets 503; ``request_timeout_s``: a request still
    waiting for its results then gets 504; ``max_images`` / ``max_upload_mb``: per request (413 beyond);
    ``max_megapixels``: pixels an image's header may declare (413 beyond, before decoding; None: the
    library's bound, 50 or ``MOLEFLOW_MAX_IMAGE_MEGAPIXELS``); ``max_side``: uploads are decoded with their
    long side at most this (a large JPEG at reduced scale), which also caps the heatmaps; ``decoders``:
    uploads decoded at once (each may take ``3 x max_megapixels`` MB while it is); ``max_connections``:
    connections uvicorn accepts at once (503 beyond), which bounds the memory of uploads in flight to about
    ``max_connections x max_upload_mb``; ``warmup``: run one image through the model before accepting
    requests, so the first request is not the slow one; ``compile_backbone``: run the backbone under
    ``torch.compile`` (same features, faster per image; the warm-up then compiles every micro-batch shape).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    device: str | None = None
    max_batch: int = 16
    max_wait_ms: float = 10.0
    queue_size: int = 64
    request_timeout_s: float = 60.0
    max_images: int = 16
    max_upload_mb: float = 64.0
    max_megapixels: float | None = None
    max_side: int = 2048
    decoders: int = 2
    max_connections: int = 64
    warmup: bool = True
    compile_backbone: bool = False

    def __post_init__(self) -> None:
        checks = (
            ("port", 0 <= self.port <= 65535, "0 to 65535 (0: any free port)"),
            ("max_batch", self.max_batch >= 1, ">= 1"),
            ("max_wait_ms", 0 <= self.max_wait_ms <= 1000, "0 to 1000"),
            ("max_images", self.max_images >= 1, ">= 1"),
            ("queue_size", self.queue_size >= self.max_images, f">= max_images ({self.max_images})"),
            ("request_timeout_s", self.request_timeout_s > 0, "> 0"),
            ("max_upload_mb", self.max_upload_mb > 0, "> 0"),
            ("max_megapixels", self.max_megapixels is None or self.max_megapixels > 0, "> 0 (or unset)"),
            ("max_side", self.max_side >= 32, ">= 32"),
            ("decoders", self.decoders >= 1, ">= 1"),
            ("max_connections", self.max_connections >= 1, ">= 1"),
        )
        for name, ok, allowed in checks:
            if not ok:
                raise ServeSettingsError(f"serve setting {name} must be {allowed}, got {getattr(self, name)}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def max_pixels(self) -> int | None:
        return None if self.max_megapixels is None else int(self.max_megapixels * 1e6)

    def replace(self, **changes: object) -> ServeSettings:
        return dataclasses.replace(self, **changes)

    def limits(self) -> dict[str, object]:
        """What a client needs to know to stay within bounds (``GET /health``)."""
        from moleflow.data.io import max_image_pixels

        return {
            "max_images": self.max_images,
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels if self.max_pixels is not None else max_image_pixels(),
            "max_side": self.max_side,
            "queue_size": self.queue_size,
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait_ms,
            "request_timeout_s": self.request_timeout_s,
        }
