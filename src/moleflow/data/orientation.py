"""EXIF / TIFF orientation: the tag that says how a stored image is to be turned for display.

Phones and some line cameras store JPEGs (and TIFFs) in the sensor's orientation and record the turn in
the Orientation tag (EXIF 0x0112 = TIFF 274); every viewer applies it, so a person labels and inspects
the image as displayed. :func:`apply_orientation` turns an array the same way Pillow's
``ImageOps.exif_transpose`` turns an image (a test checks all eight values against it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

ORIENTATION_TAG = 0x0112
#: Orientation value -> how the stored array becomes the displayed one (rows first, then columns).
_TURNS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.swapaxes(0, 1),  # transposed
    6: lambda a: np.rot90(a, -1),  # stored rotated 90 counter-clockwise: turn it clockwise
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),  # transverse
    8: lambda a: np.rot90(a, 1),
}
DESCRIPTIONS = {
    2: "mirrored",
    3: "rotated 180 degrees",
    4: "flipped",
    5: "transposed",
    6: "rotated 90 degrees",
    7: "transversed",
    8: "rotated 270 degrees",
}


def swaps_axes(orientation: int) -> bool:
    """True when the displayed image is the stored one with height and width exchanged (values 5 to 8)."""
    return orientation in (5, 6, 7, 8)


def orientation_of(image: Image.Image) -> int:
    """The image's Orientation tag, 1 (as stored) when absent, out of range or unreadable."""
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError) as exc:  # a damaged EXIF block
        log.debug("ignoring an unreadable EXIF block: %s", exc)
        return 1
    return value if isinstance(value, int) and value in _TURNS else 1


def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """``(H, W, ...)`` stored array -> the displayed array (contiguous; a copy unless orientation is 1)."""
    turn = _TURNS.get(orientation, _TURNS[1])
    return np.ascontiguousarray(turn(array))


def displayed_size(stored_hw: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``(H, W)`` as displayed, from the stored ``(H, W)``."""
    height, width = stored_hw
    return (width, height) if swaps_axes(orientation) else (height, width)
