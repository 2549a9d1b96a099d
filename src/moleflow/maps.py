"""Anomaly maps at the input's resolution: the size a map is shown at and the resize to it (numpy + PIL),
and the 1-D linear operators (bilinear upsampling, Gaussian smoothing) that turn patch scores into a map.

Shared by the torch detector, the onnxruntime detector (:mod:`moleflow.deploy.runtime`) and the figures,
so that every path resizes and smooths a map the same way.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["MAX_MAP_SIDE", "gaussian_matrix", "map_shape", "resize_map", "upsample_matrix"]

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


def upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float64: 1-D bilinear interpolation with ``align_corners=False`` (torch's rule:
    source ``(i + 0.5) * n_in / n_out - 0.5``, clamped at 0; the upper neighbour clamped at the edge)."""
    u = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        lo = min(int(math.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        u[i, lo] += 1.0 - frac
        u[i, hi] += frac
    return u


def gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """``(n, n)`` float64: 1-D Gaussian smoothing with edge-replicate padding, the kernel of
    :func:`moleflow.scoring.gaussian_kernel1d` (radius ``ceil(4 sigma)``, at least 1); identity for ``sigma <= 0``."""
    if sigma <= 0:
        return np.eye(n)
    radius = max(1, int(math.ceil(4.0 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    g = np.zeros((n, n))
    for i in range(n):
        np.add.at(g[i], np.clip(i + offsets, 0, n - 1), kernel)
    return g
