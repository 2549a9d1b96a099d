"""The numpy side of the onnxruntime detector: what the torch path does around the graphs.

- :func:`image_batch` is :func:`moleflow.features.extractor.image_to_tensor` followed by
  ``FeatureExtractor.normalize``: RGB / 255, resized straight to ``S x S`` with an antialiased bilinear
  filter (Pillow's float-mode resize, the filter torch's ``antialias=True`` was written to match), then
  ``(x - mean) / std``.
- :class:`MapOperator` is :func:`moleflow.scoring.anomaly_maps`: bilinear upsampling of the patch scores
  ``(h, w) -> (S, S)`` (``align_corners=False``) followed by the separable Gaussian with edge-replicate
  padding. Both steps are linear along each axis, so they fold into one ``(S, h)`` matrix per axis,
  built once in float64: ``map = A_y @ scores @ A_x^T``.
- :func:`image_scores` is :func:`moleflow.scoring.aggregate` (top-k mean, mean or max).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from moleflow.maps import gaussian_matrix, upsample_matrix

__all__ = ["MapOperator", "gaussian_matrix", "image_batch", "image_scores", "upsample_matrix"]


def _resize_plane(plane: np.ndarray, size: int) -> np.ndarray:
    """One float32 channel ``(H, W)`` -> ``(size, size)``, antialiased bilinear."""
    return np.asarray(Image.fromarray(plane, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float32)


def image_batch(images: Sequence[np.ndarray], size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB uint8 images ``(H, W, 3)`` of any size -> float32 ``(B, 3, size, size)``, normalised."""
    if len(images) == 0:
        raise ValueError("image_batch needs at least one image")
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected an RGB uint8 image (H, W, 3), got {getattr(image, 'dtype', type(image))} "
                f"{getattr(image, 'shape', '')}"
            )
        x = image.astype(np.float32) / np.float32(255.0)  # divide first, as image_to_tensor does
        for c in range(3):
            plane = np.ascontiguousarray(x[:, :, c])
            out[i, c] = plane if plane.shape == (size, size) else _resize_plane(plane, size)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return (out - m) / s


class MapOperator:
    """Patch scores ``(B, h, w)`` -> anomaly maps ``(B, S, S)`` float32 (module docstring)."""

    def __init__(self, grid: tuple[int, int], size: int, sigma: float) -> None:
        self.grid, self.size = (int(grid[0]), int(grid[1])), int(size)
        g = gaussian_matrix(self.size, sigma)
        self.rows = g @ upsample_matrix(self.grid[0], self.size)  # (S, h)
        self.cols = g @ upsample_matrix(self.grid[1], self.size)  # (S, w)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        if scores.ndim != 3 or scores.shape[1:] != self.grid:
            raise ValueError(f"expected patch scores (B, {self.grid[0]}, {self.grid[1]}), got {scores.shape}")
        maps = self.rows[None] @ scores.astype(np.float64) @ self.cols.T[None]
        return maps.astype(np.float32)


def image_scores(scores: np.ndarray, aggregation: str, top_k: int) -> np.ndarray:
    """Image scores ``(B,)`` float32 from patch scores ``(B, h, w)`` (:func:`moleflow.scoring.aggregate`)."""
    flat = scores.reshape(scores.shape[0], -1).astype(np.float32)
    if aggregation == "top_k":
        k = min(top_k, flat.shape[1])
        top = -np.sort(-flat, axis=1)[:, :k]  # descending, as topk: the sum runs in the same order
        return top.mean(axis=1, dtype=np.float32)
    if aggregation == "mean":
        return flat.mean(axis=1, dtype=np.float32)
    if aggregation == "max":
        return flat.max(axis=1)
    raise ValueError(f"unknown aggregation {aggregation!r}; use 'top_k', 'mean' or 'max'")
