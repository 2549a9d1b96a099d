"""The exception types of :mod:`moleflow.data` (``DatasetError`` is re-exported by :mod:`moleflow.data.base`)."""

from __future__ import annotations

from moleflow.errors import DatasetError

__all__ = ["DatasetError", "ImageTooLargeError", "NotAnImageError"]


class NotAnImageError(DatasetError):
    """The content is no image format the readers know (e.g. a text file or a PDF named ``.png``)."""


class ImageTooLargeError(DatasetError):
    """The image's header declares more pixels than the limit; it was refused before decoding."""
