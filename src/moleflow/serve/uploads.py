"""Uploaded images: the request body's size bound, the multipart form, decoding with the library's reader.

Every bound answers before the expensive step it protects: the body size from ``Content-Length`` before
the body is read (and, for a chunked body, while it is read), the image count while the form is parsed,
an image's pixel count from its header before it is decoded (:func:`moleflow.data.io.read_image_bytes`,
the reader files go through too). Errors name the file: 413 for too large or too many, 415 for what is
no image (or a body that is no multipart form), 400 for a corrupt image or a malformed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from moleflow.data.errors import DatasetError, ImageTooLargeError, NotAnImageError
from moleflow.data.io import read_image_bytes
from moleflow.serve.settings import ServeSettings

__all__ = ["BodyLimitMiddleware", "Upload", "UploadTooLargeError", "decode_uploads", "read_uploads"]

EXAMPLE = "curl -F image=@part1.png -F image=@part2.png http://HOST:PORT/predict"


class UploadTooLargeError(Exception):
    """A chunked request body grew past the limit while it was read (answered 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the request body is larger than the limit of {limit / 2**20:.0f} MiB; send fewer or smaller images"
        )


def too_large_response(error: UploadTooLargeError) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=413)


class BodyLimitMiddleware:
    """Pure ASGI middleware: a POST body over ``max_bytes`` is refused (413) without being stored."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await too_large_response(UploadTooLargeError(self.max_bytes))(scope, receive, send)
            return
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise UploadTooLargeError(self.max_bytes)  # answered by the app's exception handler
            return message

        await self.app(scope, counted, send)


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the name it was sent under (for messages and the answer) and its bytes."""

    name: str
    data: bytes


async def read_uploads(request: Request, settings: ServeSettings) -> list[Upload]:
    """The file fields of a multipart request, in order; HTTPException for a bad or oversized form."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise HTTPException(
            415, f"POST /predict takes multipart/form-data, one file field per image (e.g. {EXAMPLE}); got {content_type!r}"
        )
    try:
        form = await request.form(max_files=settings.max_images, max_fields=settings.max_images)
    except StarletteHTTPException as e:  # what Starlette's form parser raises
        if "Too many files" in str(e.detail):
            raise HTTPException(
                413, f"more than {settings.max_images} images in one request; send them in several requests"
            ) from e
        raise HTTPException(400, f"malformed multipart form: {e.detail}") from e
    try:
        uploads = []
        for i, (field, value) in enumerate(form.multi_items()):
            if not isinstance(value, UploadFile):
                raise HTTPException(400, f"form field {field!r} is text, not a file; upload images as files ({EXAMPLE})")
            uploads.append(Upload(value.filename or f"<upload {i + 1}>", await value.read()))
    finally:
        await form.close()
    if not uploads:
        raise HTTPException(400, f"no image in the request; upload one file field per image ({EXAMPLE})")
    return uploads


def decode_uploads(uploads: list[Upload], settings: ServeSettings) -> list[np.ndarray]:
    """RGB ``uint8`` ``(H, W, 3)`` per upload (long side at most ``settings.max_side``); the first bad file
    stops the request with an HTTPException whose message names it (413 / 415 / 400)."""
    images = []
    for upload in uploads:
        try:
            images.append(read_image_bytes(upload.data, upload.name, settings.max_side, settings.max_pixels))
        except ImageTooLargeError as e:
            raise HTTPException(413, str(e)) from e
        except NotAnImageError as e:
            raise HTTPException(415, str(e)) from e
        except DatasetError as e:
            raise HTTPException(400, str(e)) from e
    return images
