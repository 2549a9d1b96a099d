"""The heatmap a client gets: the anomaly map over the image on the product's own colour scale, as PNG.

The scale is :func:`moleflow.visualize.product_scale` (0 = a typical normal pixel, 1 = the pixel
threshold, colours saturate at 2), the same for every image of a product, so a good part looks calm and a
broken one hot; in an image judged anomalous the predicted defect is outlined in white. The PNG has the
map's resolution (the input's, long side capped by the server's ``max_side``).
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion

from moleflow.calibration import Calibration
from moleflow.prediction import Prediction
from moleflow.visualize import overlay_heatmap, product_scale

__all__ = ["heatmap_overlay", "png_bytes"]

OUTLINE = np.array([255, 255, 255], dtype=np.uint8)


def heatmap_overlay(image: np.ndarray, prediction: Prediction, calibration: Calibration) -> np.ndarray:
    """``image`` uint8 ``(H, W, 3)`` blended with the jet-coloured map -> uint8 ``(h, w, 3)`` at map size."""
    amap = prediction.anomaly_map
    if image.shape[:2] != amap.shape:
        image = np.asarray(Image.fromarray(image).resize(amap.shape[::-1], Image.BILINEAR))
    scaled = product_scale(amap, calibration.pixel_center, calibration.pixel_threshold)
    out = overlay_heatmap(image, scaled, 0.0, 2.0)
    if prediction.mask.any():
        edge = prediction.mask & ~binary_erosion(prediction.mask, iterations=max(1, max(amap.shape) // 256))
        out[edge] = OUTLINE
    return out


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 ``(H, W, 3)`` array encoded as PNG (fast compression: it is sent, not archived)."""
    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
