"""What :meth:`moleflow.detector.Detector.predict` returns for one image, and the images it accepts.

Accepted inputs (one, or a sequence, or a batch): a file path (``str`` / ``Path``), a ``PIL.Image`` (any
mode), a ``numpy`` array ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` of ``uint8`` (or float in
``[0, 1]``), a ``(N, H, W, 3)`` array, or a ``torch`` tensor ``(3, H, W)`` / ``(1, H, W)`` / ``(N, 3, H, W)``
as torchvision produces them (``uint8``, or float in ``[0, 1]``). Every input becomes an RGB ``uint8``
array ``(H, W, 3)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ANOMALOUS", "NORMAL", "UNKNOWN", "VERDICTS", "Prediction", "as_rgb", "decide", "iter_inputs", "make_prediction"]

NORMAL = "normal"
ANOMALOUS = "anomalous"
UNKNOWN = "unknown product"
VERDICTS = (NORMAL, ANOMALOUS, UNKNOWN)


@dataclass
class Prediction:
    """The routed product, scores, verdict, anomaly map and defect mask of one image.

    ``product``: the nearest product's name (the one the image was scored under); ``unknown``: the image
    lies beyond that product's routing-distance threshold, i.e. it shows no product the model knows, and
    ``verdict`` is then ``"unknown product"`` whatever the score. ``score``: the raw image score (the
    product's own units); ``normalized_score``: 0 = a typical normal of the product, 1.0 = its threshold.
    ``anomaly_map``: float32 ``(H, W)`` at the input's resolution (at most ``max_map_side`` pixels on the
    long side for very large inputs); ``mask``: bool ``(H, W)``, the pixels above the product's pixel
    threshold in an image judged anomalous (empty otherwise).
    """

    source: str
    product: str
    unknown: bool
    routing_distance: float
    routing_threshold: float
    score: float
    normalized_score: float
    threshold: float
    verdict: str
    pixel_threshold: float
    image_size: tuple[int, int]
    anomaly_map: np.ndarray
    mask: np.ndarray

    @property
    def anomalous(self) -> bool:
        return self.verdict == ANOMALOUS

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays): what ``predictions.json`` and the server return per image."""
        return {
            "image": self.source,
            "product": None if self.unknown else self.product,
            "nearest_product": self.product,
            "unknown_product": self.unknown,
            "routing_distance": self.routing_distance,
            "routing_threshold": self.routing_threshold,
            "score": self.score,
            "normalized_score": self.normalized_score,
            "threshold": self.threshold,
            "verdict": self.verdict,
            "pixel_threshold": self.pixel_threshold,
            "defect_pixels": int(self.mask.sum()),
            "image_size": list(self.image_size),
            "map_size": list(self.anomaly_map.shape),
        }


def decide(score: float, distance: float, calibration: Any) -> tuple[str, bool, float]:
    """``(verdict, unknown, normalized score)`` of an image scored under a product with ``calibration``
    (a :class:`moleflow.calibration.Calibration`): beyond the routing threshold it is an unknown product,
    else anomalous above the image threshold."""
    from moleflow.calibration import normalized_score

    unknown = bool(distance > calibration.unknown_threshold)
    verdict = UNKNOWN if unknown else (ANOMALOUS if score > calibration.image_threshold else NORMAL)
    return verdict, unknown, float(normalized_score(score, calibration.image_center, calibration.image_threshold))


def make_prediction(
    source: str, image_size: tuple[int, int], product: str, calibration: Any, score: float, distance: float, amap: np.ndarray
) -> Prediction:
    """The :class:`Prediction` of one image from its routed ``product``, raw ``score``, routing ``distance``
    and anomaly map ``amap (H, W)`` (already at the size it is returned at); the mask is set when anomalous."""
    verdict, unknown, normalized = decide(score, distance, calibration)
    mask = (amap > calibration.pixel_threshold) if verdict == ANOMALOUS else np.zeros(amap.shape, bool)
    return Prediction(
        source=source,
        product=product,
        unknown=unknown,
        routing_distance=float(distance),
        routing_threshold=calibration.unknown_threshold,
        score=float(score),
        normalized_score=normalized,
        threshold=calibration.image_threshold,
        verdict=verdict,
        pixel_threshold=calibration.pixel_threshold,
        image_size=(int(image_size[0]), int(image_size[1])),
        anomaly_map=amap,
        mask=mask,
    )


def as_rgb(image: Any) -> np.ndarray:
    """One input (module docstring) -> RGB ``uint8`` ``(H, W, 3)``; ``ValueError`` saying what was wrong."""
    from PIL import Image

    from moleflow.data.io import read_image, to_rgb_uint8

    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return to_rgb_uint8(image)
    if _is_tensor(image):
        array = image.detach().cpu().numpy()
        if array.ndim != 3 or array.shape[0] not in (1, 3):
            raise ValueError(f"expected a tensor (3, H, W) or (1, H, W), got shape {tuple(array.shape)}")
        return _array_to_rgb(np.moveaxis(array, 0, -1), "tensor")
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, "array")
    raise ValueError(
        f"cannot read an image from a {type(image).__name__}; give a path, a PIL image, an (H, W, 3) uint8 array "
        "or a (3, H, W) tensor"
    )


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _array_to_rgb(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"expected an image {what} (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"expected a uint8 image {what}, or floats in [0, 1]; got dtype {array.dtype}")
        if not np.isfinite(array).all():
            raise ValueError(f"image {what} contains NaN or inf")
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    if array.shape[2] == 4:
        array = array[:, :, :3]  # alpha dropped, as for image files
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def input_batches(images: Any, batch_size: int) -> Iterator[list[tuple[np.ndarray, str]]]:
    """:func:`iter_inputs` in lists of at most ``batch_size`` images (decoded one batch ahead, no more)."""
    chunk: list[tuple[np.ndarray, str]] = []
    for item in iter_inputs(images):
        chunk.append(item)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def iter_inputs(images: Any) -> Iterator[tuple[np.ndarray, str]]:
    """``(rgb (H, W, 3) uint8, label)`` per image of a single input, a sequence, or a 4-D batch."""
    if isinstance(images, (str, Path)) or _is_single(images):
        images = [images]
    elif (isinstance(images, np.ndarray) or _is_tensor(images)) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, Iterable):
        raise ValueError(f"expected an image or a sequence of images, got {type(images).__name__}")
    for i, image in enumerate(images):
        label = str(image) if isinstance(image, (str, Path)) else getattr(image, "filename", "") or f"<image {i}>"
        yield as_rgb(image), label


def _is_single(x: Any) -> bool:
    from PIL import Image

    if isinstance(x, Image.Image):
        return True
    if isinstance(x, np.ndarray) or _is_tensor(x):
        return x.ndim in (2, 3)
    return False
