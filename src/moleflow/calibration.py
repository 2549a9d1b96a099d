"""Decision thresholds set on normal images a product did not train on.

Three thresholds per product, each at a target false-alarm rate (FPR) on normals:

- image: an image whose score exceeds it is *anomalous*;
- pixel: anomaly-map pixels above it form the predicted defect mask;
- unknown: an image whose routing distance to its nearest product exceeds that product's threshold is
  an *unknown product* (not scored as a defect). This one is ``margin`` times the distance at the target
  rate: a defective part of a known product is farther from its prototype than the product's normals
  (about 40 % of known anomalous test images exceed the 1 % normal rate on our data), another product
  farther still (docs/RESULTS.md, "Unknown products").

Estimator (:func:`threshold_at_fpr`). With ``n`` calibration values and target ``a``, the split-conformal
rank ``k = ceil((n + 1) (1 - a))`` gives a threshold that a new normal exceeds with probability at most
``a`` whatever the score distribution (Vovk et al. 2005; Angelopoulos & Bates 2021, sec. 1). It exists
only for ``n >= 1/a - 1`` (99 images at 1 %); with fewer, a normal fit to the values (to their logarithms
for the positive, right-skewed routing distances) is extrapolated to the ``1 - a`` quantile, never below
the largest value seen. Which rule was used is recorded.

The values themselves are kept (image scores, routing distances, upper pixel quantiles), so a product can
be re-thresholded at another rate later without its images. With ``scoring.global_weight > 0`` the image
score is the flow's score mixed with the routing distance (:mod:`moleflow.score_fusion`): the stored
``scores`` stay the flow's, and the image threshold and centre are on the mixed scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from moleflow.score_fusion import ScoreFusion

__all__ = [
    "PIXEL_TAIL_FPRS",
    "Calibration",
    "CalibrationError",
    "ThresholdRule",
    "normalized_score",
    "pixel_tail",
    "threshold_at_fpr",
    "threshold_from_tail",
]

#: FPRs at which the upper tail of the calibration pixels is stored (1e-5 .. 0.5, log-spaced).
PIXEL_TAIL_FPRS: tuple[float, ...] = tuple(float(x) for x in np.logspace(-5, math.log10(0.5), 49))


class CalibrationError(ValueError):
    """Calibration data or settings that cannot give a threshold."""


@dataclass(frozen=True)
class ThresholdRule:
    """A threshold and how it was obtained: ``empirical`` (conformal rank), ``gaussian`` or ``manual``."""

    value: float
    rule: str


def _check_fpr(fpr: float, what: str = "fpr") -> float:
    if not 0.0 < float(fpr) < 0.5:
        raise CalibrationError(f"{what} must lie in (0, 0.5), got {fpr}")
    return float(fpr)


def threshold_at_fpr(values: Sequence[float] | np.ndarray, fpr: float, *, log: bool = False) -> ThresholdRule:
    """The threshold a new normal value exceeds with probability ``fpr`` (module docstring).

    ``values``: normal calibration values ``(n,)``, ``n >= 2``; ``log``: fit the normal model to
    ``log(values)`` (values must be positive).
    """
    fpr = _check_fpr(fpr)
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size < 2:
        raise CalibrationError(f"need at least 2 normal calibration values, got {x.size}")
    if not np.isfinite(x).all():
        raise CalibrationError("calibration values contain NaN or inf")
    rank = math.ceil((x.size + 1) * (1.0 - fpr))
    if rank <= x.size:
        return ThresholdRule(float(x[rank - 1]), "empirical")
    from scipy.stats import norm  # here: predicting (onnx runtime included) never needs scipy

    if log:
        if x[0] <= 0:
            raise CalibrationError("log-normal threshold needs positive values")
        y = np.log(x)
        value = math.exp(y.mean() + norm.ppf(1.0 - fpr) * y.std(ddof=1))
    else:
        value = float(x.mean() + norm.ppf(1.0 - fpr) * x.std(ddof=1))
    return ThresholdRule(max(value, float(x[-1])), "gaussian")


def pixel_tail(pixels: np.ndarray) -> list[float]:
    """Upper quantiles ``1 - f`` of normal anomaly-map pixels for every ``f`` in :data:`PIXEL_TAIL_FPRS`."""
    flat = np.asarray(pixels, dtype=np.float64).ravel()
    if flat.size == 0 or not np.isfinite(flat).all():
        raise CalibrationError("calibration anomaly maps are empty or contain NaN/inf")
    return [float(v) for v in np.quantile(flat, [1.0 - f for f in PIXEL_TAIL_FPRS])]


def threshold_from_tail(tail: Sequence[float], fpr: float) -> float:
    """Pixel threshold at ``fpr`` from a stored :func:`pixel_tail`, interpolated in ``log(fpr)``."""
    fpr = _check_fpr(fpr, "pixel fpr")
    if not PIXEL_TAIL_FPRS[0] <= fpr <= PIXEL_TAIL_FPRS[-1]:
        raise CalibrationError(f"pixel fpr must lie in [{PIXEL_TAIL_FPRS[0]:g}, {PIXEL_TAIL_FPRS[-1]:g}], got {fpr}")
    logs = np.log(np.asarray(PIXEL_TAIL_FPRS))
    # np.interp needs increasing x: log(fpr) increases while the quantile value decreases
    return float(np.interp(math.log(fpr), logs, np.asarray(tail, dtype=np.float64)))


def normalized_score(score: float | np.ndarray, center: float, threshold: float) -> float | np.ndarray:
    """``(score - center) / (threshold - center)``: 0 = a typical normal, 1.0 = the threshold."""
    span = threshold - center
    if not span > 0:
        span = max(abs(threshold), 1.0) * 1e-6  # degenerate calibration (all normals equal): keep the sign
    return (score - center) / span


@dataclass(frozen=True)
class Calibration:
    """A product's thresholds and the normal values they were set on (see the module docstring).

    ``method``: ``holdout`` (a share of the training normals, not trained on), ``images`` (a separate
    folder of normals), ``in_sample`` (the training images themselves, when too few were given; optimistic)
    or ``manual`` (``image_threshold`` set by hand). ``scoring``: the scoring settings the values were made
    under; scores made under other settings are on another scale and must not be compared. ``fusion``: how
    the flow's image score and the routing distance make the image score (``scoring.global_weight > 0``;
    None: the flow's score alone); ``scores`` are the flow's, the image threshold is on :meth:`image_scores`.
    """

    method: str
    images: int
    scoring: dict[str, Any]
    image_fpr: float | None
    image_threshold: float
    image_rule: str
    image_center: float
    pixel_fpr: float
    pixel_threshold: float
    pixel_center: float
    unknown_fpr: float
    unknown_threshold: float
    unknown_rule: str
    unknown_margin: float
    scores: list[float] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)
    pixel_tail: list[float] = field(default_factory=list)
    fusion: ScoreFusion | None = None

    def image_scores(self, scores: np.ndarray | float, distances: np.ndarray | float) -> np.ndarray:
        """The image scores the threshold applies to, float64: the flow's image ``scores`` as they are, or
        mixed with the routing ``distances`` (same shape) under :attr:`fusion`."""
        if self.fusion is None:
            return np.asarray(scores, dtype=np.float64)
        return self.fusion(scores, distances)

    @classmethod
    def fit(
        cls,
        *,
        method: str,
        scoring: Mapping[str, Any],
        scores: np.ndarray,
        distances: np.ndarray,
        pixels: np.ndarray,
        image_fpr: float,
        pixel_fpr: float,
        unknown_fpr: float,
        unknown_margin: float,
        global_weight: float = 0.0,
    ) -> Calibration:
        """Thresholds from normal image scores ``(n,)`` (the flow's), routing distances ``(n,)`` and map pixels
        (any shape); ``global_weight > 0``: the image threshold is set on the scores mixed with the distances."""
        fusion = ScoreFusion.fit(global_weight, scores, distances) if global_weight > 0 else None
        final = np.asarray(scores, dtype=np.float64) if fusion is None else fusion(scores, distances)
        image = threshold_at_fpr(final, image_fpr)
        unknown = threshold_at_fpr(distances, unknown_fpr, log=True)
        tail = pixel_tail(pixels)
        return cls(
            method=method,
            images=int(np.asarray(scores).size),
            scoring=dict(scoring),
            image_fpr=float(image_fpr),
            image_threshold=image.value,
            image_rule=image.rule,
            image_center=float(np.median(final)),
            pixel_fpr=float(pixel_fpr),
            pixel_threshold=threshold_from_tail(tail, pixel_fpr),
            pixel_center=float(np.median(np.asarray(pixels))),
            unknown_fpr=float(unknown_fpr),
            unknown_threshold=unknown_margin * unknown.value,
            unknown_rule=unknown.rule,
            unknown_margin=float(unknown_margin),
            scores=[float(s) for s in np.asarray(scores).ravel()],
            distances=[float(d) for d in np.asarray(distances).ravel()],
            pixel_tail=tail,
            fusion=fusion,
        )

    def with_rates(
        self, image_fpr: float | None = None, pixel_fpr: float | None = None, unknown_fpr: float | None = None
    ) -> Calibration:
        """The same calibration values re-thresholded at other rates (``None`` keeps a rate)."""
        changes: dict[str, Any] = {}
        if image_fpr is not None:
            rule = threshold_at_fpr(self.image_scores(self.scores, self.distances), image_fpr)
            changes.update(image_fpr=float(image_fpr), image_threshold=rule.value, image_rule=rule.rule)
        if pixel_fpr is not None:
            changes.update(pixel_fpr=float(pixel_fpr), pixel_threshold=threshold_from_tail(self.pixel_tail, pixel_fpr))
        if unknown_fpr is not None:
            rule = threshold_at_fpr(self.distances, unknown_fpr, log=True)
            changes.update(
                unknown_fpr=float(unknown_fpr), unknown_threshold=self.unknown_margin * rule.value, unknown_rule=rule.rule
            )
        return replace(self, **changes)

    def with_threshold(self, image_threshold: float) -> Calibration:
        """A hand-set image threshold (the pixel and unknown thresholds stay)."""
        if not math.isfinite(image_threshold):
            raise CalibrationError(f"threshold must be a finite number, got {image_threshold}")
        return replace(self, image_threshold=float(image_threshold), image_rule="manual", image_fpr=None)

    def expected_fpr(self) -> float | None:
        """Share of the calibration images above the image threshold (what the threshold gave on them)."""
        if not self.scores:
            return None
        return float(np.mean(self.image_scores(self.scores, self.distances) > self.image_threshold))

    def summary(self) -> dict[str, Any]:
        """The thresholds and rates, without the stored values (for tables and results.json)."""
        out = asdict(self)
        for key in ("scores", "distances", "pixel_tail"):
            out.pop(key)
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        data = dict(data)
        try:
            if data.get("fusion") is not None:
                data["fusion"] = ScoreFusion.from_json(data["fusion"])
            return cls(**data)
        except TypeError as e:
            raise CalibrationError(f"calibration record does not match this moleflow version: {e}") from e
