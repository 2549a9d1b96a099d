"""Anomaly-map overlays and small prediction figures, written atomically.

Figures are ``matplotlib.figure.Figure`` objects bound to the Agg canvas explicitly: no display is needed
and pyplot's process-wide backend and figure registry are never touched (importing this module changes
nothing for the caller's own plots).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

__all__ = [
    "atomic_write",
    "draw_mask_contour",
    "new_figure",
    "overlay_heatmap",
    "resize_map",
    "save_figure",
    "save_png",
    "save_prediction_figure",
]


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resize_map(amap: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize a 2-D map ``(h, w)`` to ``size = (H, W)`` (bilinear, or nearest for masks); float32 out."""
    amap = np.asarray(amap, dtype=np.float32)
    if amap.ndim != 2:
        raise ValueError(f"expected a 2-D map (H, W), got shape {amap.shape}")
    if amap.shape == tuple(size):
        return amap
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(amap, mode="F").resize((size[1], size[0]), resample), dtype=np.float32)


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
    vmin: float,
    vmax: float,
    mask: np.ndarray | None = None,
) -> Path:
    """Panels image | heatmap overlay (| ground-truth mask contour), with ``title`` above; atomic PNG."""
    image = _check_image(image)
    panels = 3 if mask is not None else 2
    fig = new_figure(2.6 * panels, 2.9)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    axes[1].imshow(overlay_heatmap(image, amap, vmin, vmax))
    axes[1].set_title("anomaly map", fontsize=8)
    if mask is not None:
        draw_mask_contour(axes[2], image, mask)
        axes[2].set_title("ground truth", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
