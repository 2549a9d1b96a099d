"""Where a :class:`~moleflow.detector.Detector` gets backbone features: the frozen extractor, run once per
image set, optionally through an on-disk cache shared between runs (benchmarks and analyses repeat the
same images under many flow settings).

A cached file is keyed by the backbone config and a digest of the samples (file path, size and mtime, or
the pixels of in-memory samples); a stale or foreign file is ignored with a warning and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moleflow.features.cache import CachedFeatures, CacheMismatchError, cache_fingerprint, extract_features
from moleflow.features.extractor import FeatureExtractor

__all__ = ["FeatureSource", "samples_digest"]

log = logging.getLogger(__name__)


def samples_digest(samples) -> str:
    """SHA-256 identifying a list of samples: file path, size and mtime for files, pixels for arrays."""
    h = hashlib.sha256()
    for sample in samples:
        path = getattr(sample, "image_path", None)
        if path is not None:
            stat = Path(path).stat()
            h.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        else:
            h.update(sample.name.encode() + np.ascontiguousarray(sample.load_image()).tobytes())
    return h.hexdigest()


@dataclass
class FeatureSource:
    """``source(samples, desc) -> CachedFeatures`` (CPU): extraction batched on ``device``, cached if asked.

    ``need_context``: keep the multi-layer context maps (scale context). ``num_workers``: image-decoding
    processes. ``cache_dir``: directory of cached feature files (None: no cache).
    """

    extractor: FeatureExtractor
    need_context: bool
    batch_size: int = 16
    num_workers: int = 0
    device: torch.device | str = "cpu"
    cache_dir: Path | None = None
    progress: bool = True

    def __call__(self, samples: Sequence, desc: str = "features") -> CachedFeatures:
        if self.cache_dir is None:
            return self._extract(samples, desc)
        expected = cache_fingerprint(
            self.extractor.config,
            samples=samples_digest(samples),
            context=self.need_context,
            **({} if self.extractor.with_pooled else {"pooled": False}),
        )
        key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(self.cache_dir) / f"{self.extractor.config.name}-{key}.safetensors"  # one file per fingerprint
        if path.exists():
            try:
                return CachedFeatures.load(path, expected)
            except (CacheMismatchError, OSError, ValueError) as e:  # a truncated or foreign file is rebuilt
                log.warning("ignoring feature cache file %s: %s", path, e)
        feats = self._extract(samples, desc)
        feats.fingerprint = expected
        feats.save(path)
        return feats

    def _extract(self, samples: Sequence, desc: str) -> CachedFeatures:
        return extract_features(
            self.extractor,
            samples,
            need_context=self.need_context,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=self.device,
            progress=self.progress,
            desc=desc,
        )
