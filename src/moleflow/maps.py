"""Anomaly maps at the input's resolution: the size a map is shown at and the resize to it (numpy + PIL).

Shared by the torch detector, the onnxruntime detector (:mod:`moleflow.deploy.runtime`) and the figures,
so that every path resizes a map the same way.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["MAX_MAP_SIDE", "map_shape", "resize_map"]

MAX_MAP_SIDE = 2048


def map_shape(shape: tuple[int, int], max_side: int = MAX_MAP_SIDE) -> tuple[int, int]:
    """The input's ``(H, W)``, scaled down so that its long side is at most ``max_side``."""
    h, w = shape
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_map(amap: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize a 2-D map ``(h, w)`` to ``size = (H, W)`` (bilinear, or nearest for masks); float32 out."""
    amap = np.asarray(amap, dtype=np.float32)
    if amap.ndim != 2:
        raise ValueError(f"expected a 2-D map (H, W), got shape {amap.shape}")
    if amap.shape == tuple(size):
        return amap
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(amap, mode="F").resize((size[1], size[0]), resample), dtype=np.float32)
