"""The heatmap PNG: the map on the product's own scale over the image, the defect outlined, hand-computed."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
from PIL import Image

from moleflow.prediction import Prediction
from moleflow.serve.heatmap import heatmap_overlay, png_bytes

JET_LOW = np.array([0.0, 0.0, 0.5]) * 255  # matplotlib's jet at 0 and at 1
JET_HIGH = np.array([0.5, 0.0, 0.0]) * 255


def _prediction(amap: np.ndarray, mask: np.ndarray) -> Prediction:
    return Prediction(
        source="x",
        product="p",
        unknown=False,
        routing_distance=1.0,
        routing_threshold=2.0,
        score=3.0,
        normalized_score=2.0,
        threshold=1.0,
        verdict="anomalous" if mask.any() else "normal",
        pixel_threshold=7.0,
        image_size=amap.shape,
        anomaly_map=amap.astype(np.float32),
        mask=mask,
    )


def test_colours_follow_the_product_scale_and_the_defect_is_outlined():
    center, threshold = 3.0, 7.0  # product scale: (v - 3) / 4, shown from 0 to 2
    amap = np.full((64, 64), center)
    amap[:, 32:] = center + 3 * (threshold - center)  # 3x: beyond the top of the scale, saturates
    mask = np.zeros((64, 64), bool)
    mask[20:30, 40:50] = True
    image = np.full((64, 64, 3), 100, np.uint8)
    out = heatmap_overlay(image, _prediction(amap, mask), SimpleNamespace(pixel_center=center, pixel_threshold=threshold))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[5, 5], np.rint(0.5 * 100 + 0.5 * JET_LOW))  # a typical normal pixel
    np.testing.assert_array_equal(out[5, 60], np.rint(0.5 * 100 + 0.5 * JET_HIGH))
    ring = mask & ~np.pad(mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:], 1)
    assert (out[ring] == 255).all() and ring.sum() == 36  # the 10x10 block's one-pixel border
    assert not (out[mask & ~ring] == 255).all(axis=1).any()  # inside: the map, not the outline


def test_an_image_of_another_size_is_resized_to_the_map_and_encoded_as_png():
    amap = np.linspace(0, 1, 48 * 80).reshape(48, 80)
    image = np.zeros((24, 40, 3), np.uint8)
    out = heatmap_overlay(
        image, _prediction(amap, np.zeros((48, 80), bool)), SimpleNamespace(pixel_center=0.0, pixel_threshold=0.5)
    )
    assert out.shape == (48, 80, 3)
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(out))))
    np.testing.assert_array_equal(decoded, out)  # lossless
