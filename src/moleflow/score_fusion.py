"""The image score with an image-level Gaussian beside the flow (``scoring.global_weight``).

The flow scores patches, and its image score is the mean of the top-k patch scores: a defect that changes
the whole image a little (an uneven surface, a darker cell) moves no single patch far. A Gaussian of whole
images' feature statistics sees such defects (Rippel et al., "Modeling the distribution of normal data in
pre-trained deep features for anomaly detection", ICPR 2020), and moleflow already keeps one per product:
the router's prototype, whose squared Mahalanobis distance to an image is computed for every image anyway
(the routing distance, under the product's own covariance). With ``router.feature=patch_moments`` that
Gaussian is over the per-channel mean and spread of the image's patches.

The two are on unrelated scales, so each is standardised by its mean and standard deviation on the
product's held-out normals (the calibration images), then mixed::

    score = (1 - w) * (s - mean_s) / std_s + w * (log d - mean_log_d) / std_log_d

with ``s`` the flow's image score, ``d`` the (squared) routing distance and ``w = scoring.global_weight``.
The distance enters by its logarithm: squared distances of normals have a long right tail (the unknown-product
threshold models them as log-normal for the same reason), which would otherwise set the mix's threshold on a
few far normals; on the six-product benchmark it also ranked defects better (docs/QUALITY_STUDY.md). The
statistics are kept with the product's calibration; the image threshold is set on the mixed scores of the
same normals. ``w = 0`` leaves the flow's score as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["ScoreFusion"]

#: distances are floored here before their logarithm (a squared distance of exactly 0 is an image equal to
#: its prototype)
MIN_DISTANCE = 1e-12

#: a spread below this (relative to the mean's magnitude, or absolute near 0) is taken as this: a product
#: whose calibration normals all score alike must not divide by zero
MIN_RELATIVE_STD = 1e-6


def _log(distances: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(distances, MIN_DISTANCE))


def _spread(values: np.ndarray) -> float:
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return max(std, MIN_RELATIVE_STD * max(1.0, abs(float(values.mean()))))


@dataclass(frozen=True)
class ScoreFusion:
    """``w``, and the mean and spread of the flow's image scores and of the log routing distances on normals."""

    weight: float
    score_mean: float
    score_std: float
    log_distance_mean: float
    log_distance_std: float

    @classmethod
    def fit(cls, weight: float, scores: np.ndarray, distances: np.ndarray) -> ScoreFusion:
        """From the flow's image scores ``(n,)`` and routing distances ``(n,)`` of normal images, ``n >= 2``."""
        if not 0.0 <= weight < 1.0:
            raise ValueError(f"scoring.global_weight must lie in [0, 1), got {weight}")
        s, d = (np.asarray(v, dtype=np.float64).ravel() for v in (scores, distances))
        if s.size != d.size or s.size < 2:
            raise ValueError(f"need as many scores as distances, at least 2, got {s.size} and {d.size}")
        if not (np.isfinite(s).all() and np.isfinite(d).all()) or (d < 0).any():
            raise ValueError("calibration scores or distances contain NaN, inf or negative distances")
        log_d = _log(d)
        return cls(float(weight), float(s.mean()), _spread(s), float(log_d.mean()), _spread(log_d))

    def __call__(self, scores: np.ndarray | float, distances: np.ndarray | float) -> np.ndarray:
        """The mixed image scores, float64, shaped like ``scores``."""
        s = (np.asarray(scores, dtype=np.float64) - self.score_mean) / self.score_std
        d = (_log(np.asarray(distances, dtype=np.float64)) - self.log_distance_mean) / self.log_distance_std
        return (1.0 - self.weight) * s + self.weight * d

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScoreFusion:
        return cls(**{k: float(v) for k, v in data.items()})
