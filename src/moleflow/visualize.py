"""Anomaly-map overlays and small prediction figures, written atomically.

Figures are ``matplotlib.figure.Figure`` objects bound to the Agg canvas explicitly: no display is needed
and pyplot's process-wide backend and figure registry are never touched (importing this module changes
nothing for the caller's own plots).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from moleflow.atomic import atomic_write
from moleflow.maps import resize_map

__all__ = [
    "atomic_write",
    "draw_mask_contour",
    "draw_outline",
    "new_figure",
    "overlay_heatmap",
    "product_scale",
    "resize_map",
    "save_figure",
    "save_png",
    "save_prediction_figure",
]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    return image


def overlay_heatmap(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Blend the jet-coloured map over ``image``.

    ``image``: uint8 ``(H, W, 3)``; ``amap``: float ``(h, w)``, resized bilinearly to ``(H, W)`` when it
    differs, then normalised as ``clip((amap - vmin) / (vmax - vmin), 0, 1)``. Returns uint8 ``(H, W, 3)``
    = ``(1 - alpha) * image + alpha * jet(map)``.
    """
    image = _check_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    amap = resize_map(amap, image.shape[:2])
    span = max(float(vmax) - float(vmin), 1e-12)
    norm = np.clip((np.nan_to_num(amap, nan=float(vmin)) - float(vmin)) / span, 0.0, 1.0)
    colour = matplotlib.colormaps["jet"](norm)[..., :3] * 255.0
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a uint8 ``(H, W)`` or ``(H, W, 3)`` array as PNG, atomically."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W) or (H, W, 3) array, got {array.dtype} {array.shape}")
    img = Image.fromarray(array)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure with an Agg canvas attached."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Render ``fig`` to PNG at ``path`` atomically."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def draw_mask_contour(ax: Axes, image: np.ndarray, mask: np.ndarray) -> None:
    """Show ``image`` with the outline of the binary ``mask`` (resized nearest to the image) in red."""
    ax.imshow(image)
    mask = resize_map(np.asarray(mask, dtype=np.float32), image.shape[:2], nearest=True)
    if mask.max() > 0 and mask.min() < mask.max():
        ax.contour(mask > 0.5, levels=[0.5], colors="red", linewidths=1.0)


def save_prediction_figure(
    image: np.ndarray,
    amap: np.ndarray,
    path: str | os.PathLike[str],
    title: str,
    *,
    center: float,
    threshold: float,
    defect: np.ndarray | None = None,
) -> Path:
    """Panels image (predicted defect outlined) | heatmap on the product's own colour scale, atomic PNG.

    The scale is the same for every image of a product: ``(amap - center) / (threshold - center)`` from
    0 (a typical normal pixel) to 2, with the pixel threshold at 1, marked on the colour bar; so a normal
    part looks calm and a broken one hot, instead of every map being stretched to its own range.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    image = _check_image(image)
    scaled = product_scale(amap, center, threshold)
    fig = new_figure(5.6, 2.9)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    axes[0].imshow(image)
    if defect is not None and np.any(defect):
        draw_outline(axes[0], defect, image.shape[:2])
    axes[0].set_title("image (predicted defect outlined)" if defect is not None else "image", fontsize=8)
    axes[1].imshow(overlay_heatmap(image, scaled, 0.0, 2.0))
    axes[1].set_title("anomaly map", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 2.0), cmap="jet"), ax=axes[1], fraction=0.046, pad=0.04)
    bar.ax.axhline(1.0, color="white", linewidth=2.0)
    bar.set_ticks([0.0, 1.0, 2.0], labels=["normal", "threshold", "2x"], fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def product_scale(amap: np.ndarray, center: float, threshold: float) -> np.ndarray:
    """``(amap - center) / (threshold - center)``: 0 = a typical normal pixel, 1 = the pixel threshold."""
    span = threshold - center if threshold > center else 1.0
    return (np.asarray(amap, dtype=np.float32) - np.float32(center)) / np.float32(span)


def draw_outline(ax: Axes, mask: np.ndarray, shape: tuple[int, int]) -> None:
    """Outline the binary ``mask`` (resized nearest to ``shape``) in white over what ``ax`` shows."""
    mask = resize_map(np.asarray(mask, dtype=np.float32), shape, nearest=True)
    if 0 < mask.max() and mask.min() < mask.max():
        ax.contour(mask > 0.5, levels=[0.5], colors="white", linewidths=1.2)
