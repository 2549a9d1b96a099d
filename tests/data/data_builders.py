"""Helpers shared by the data tests: tiny images and masks, and where the shared real datasets live.

Imported by name (``from data_builders import ...``); pytest puts this directory on ``sys.path``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SHARED_DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
SIZE = 8  # pixels; tiny images keep the tests fast

WritePng = Callable[..., Path]


def write_image(path: Path, array: np.ndarray) -> Path:
    """Save ``array`` with Pillow (format from the suffix), creating directories; return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def rgb(value: int) -> np.ndarray:
    """A ``(SIZE, SIZE, 3)`` uint8 image filled with ``value``."""
    return np.full((SIZE, SIZE, 3), value, dtype=np.uint8)


def square_mask() -> np.ndarray:
    """A ``(SIZE, SIZE)`` 0/255 mask with a 2x2 square at rows/cols 2-3."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[2:4, 2:4] = 255
    return mask
