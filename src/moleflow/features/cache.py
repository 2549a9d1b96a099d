"""Per-task feature cache: the frozen backbone runs once per image, training epochs read tensors.

``extract_features`` streams a task's samples through a DataLoader (image decoding and resizing in
the workers, the backbone in the main process) into :class:`CachedFeatures`, which slices, batches,
and saves to / loads from safetensors. A saved cache carries a fingerprint of the backbone config
(name, image size, layers, embed_dim, pretrained; grid and local aggregation when not at their defaults;
the extraction version) and is refused under a different one.

Memory: ``dtype=torch.float16`` halves the size of ``patches`` and ``context`` (e.g. 300 ViT images:
180 MB -> 90 MB); ``pooled`` stays float32 because the router inverts its covariance.
:meth:`CachedFeatures.to` brings a batch back to float32 for training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from moleflow import __version__
from moleflow.atomic import atomic_write
from moleflow.config import LEGACY_BACKBONE, BackboneConfig
from moleflow.features.extractor import FeatureExtractor, image_to_tensor

FORMAT = "moleflow.features"
FORMAT_VERSION = 1
LOAD_SIDE_FACTOR = 4  # images are decoded to at most 4x the model's input side before the final resize
Index = int | np.integer | slice | Sequence[int] | Sequence[bool] | np.ndarray | torch.Tensor


class ImageLoadError(RuntimeError):
    """An image could not be loaded or converted; the message names the file."""


class CacheMismatchError(ValueError):
    """A saved feature cache was made under another backbone config, or is not a feature cache."""


class SupportsLoadImage(Protocol):
    """What :func:`extract_features` needs of a sample (``moleflow.data.base.Sample`` has it)."""

    def load_image(self, max_side: int | None = None) -> np.ndarray:
        """uint8 RGB image (H, W, 3), downscaled on load to a long side of at most ``max_side``."""
        ...


#: How features are computed from a config, where that changes their values (if only by rounding):
#: 2 = EfficientNet BatchNorms folded into the convolutions. Caches of an earlier way are not reused.
EXTRACTION_VERSION = 2


def cache_fingerprint(config: BackboneConfig, **extra: Any) -> dict[str, Any]:
    """JSON-able identity of the features a config produces; ``extra`` adds keys (e.g. a sample digest)."""
    fingerprint = {
        "backbone": config.name,
        "image_size": config.image_size,
        "layers": list(config.layers),
        "embed_dim": config.embed_dim,
        "pretrained": config.pretrained,
        "extraction": EXTRACTION_VERSION,
        # newer keys only when they differ from what every earlier cache had: those caches stay valid
        **{k: getattr(config, k) for k, legacy in LEGACY_BACKBONE.items() if getattr(config, k) != legacy},
        **extra,
    }
    return json.loads(json.dumps(fingerprint, sort_keys=True))


@dataclass
class CachedFeatures:
    """Features of ``N`` images, on the CPU.

    patches: (N, H, W, D); context: (N, H, W, C) or None; pooled: (N, G) float32.
    Indexing (int, slice, index list/array/tensor, boolean mask) returns a ``CachedFeatures``;
    a single position keeps the leading axis (``N = 1``).
    """

    patches: torch.Tensor
    context: torch.Tensor | None
    pooled: torch.Tensor
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.patches.shape[0]
        if self.patches.ndim != 4 or self.pooled.ndim != 2 or self.pooled.shape[0] != n:
            raise ValueError(
                f"expected patches (N, H, W, D) and pooled (N, G), got {tuple(self.patches.shape)} "
                f"and {tuple(self.pooled.shape)}"
            )
        if self.context is not None and (self.context.ndim != 4 or self.context.shape[:3] != self.patches.shape[:3]):
            raise ValueError(
                f"context {tuple(self.context.shape)} must be (N, H, W, C) on the grid of patches "
                f"{tuple(self.patches.shape)}"
            )

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    def __getitem__(self, index: Index) -> CachedFeatures:
        index = self._batch_index(index)
        return dataclasses.replace(
            self,
            patches=self.patches[index],
            context=None if self.context is None else self.context[index],
            pooled=self.pooled[index],
        )

    def _batch_index(self, index: Index) -> slice | torch.Tensor:
        """Any index as one that keeps the leading N axis (a single position becomes a length-1 slice)."""
        if isinstance(index, slice):
            return index
        if isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.ndim == 0):
            i = int(index)
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for {len(self)} cached images")
            return slice(i % len(self), i % len(self) + 1)
        tensor = torch.as_tensor(index)
        if tensor.dtype == torch.bool:
            return tensor
        if tensor.is_floating_point() or tensor.is_complex():
            raise TypeError(f"index with integers, a slice or a boolean mask, got {tensor.dtype}")
        return tensor.long()

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[CachedFeatures]:
        """Mini-batches in order, or in a random order drawn from ``generator`` when ``shuffle``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            chunk = order[start : start + batch_size]
            if drop_last and len(chunk) < batch_size:
                return
            yield self[chunk]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> CachedFeatures:
        """Copy to ``device`` as ``dtype`` (float32 by default, undoing a float16 cache)."""
        return dataclasses.replace(
            self,
            patches=self.patches.to(device=device, dtype=dtype),
            context=None if self.context is None else self.context.to(device=device, dtype=dtype),
            pooled=self.pooled.to(device=device, dtype=dtype),
        )

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file atomically (:func:`moleflow.atomic.atomic_write`)."""
        path = Path(path)
        tensors = {"patches": self.patches, "pooled": self.pooled}
        if self.context is not None:
            tensors["context"] = self.context
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "moleflow_version": __version__,
        }
        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path, expected: Mapping[str, Any] | None = None) -> CachedFeatures:
        """Read a cache written by :meth:`save`; with ``expected`` (see :func:`cache_fingerprint`),
        raise :class:`CacheMismatchError` unless the stored fingerprint equals it."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors' own error types for truncated or garbage files
            raise CacheMismatchError(f"feature cache file {path} is unreadable ({e}); delete it") from e
        if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
            raise CacheMismatchError(
                f"{path} is not a moleflow feature cache of format version {FORMAT_VERSION} "
                f"(found format={meta.get('format')!r}, version={meta.get('format_version')!r}); delete it"
            )
        stored = json.loads(meta.get("fingerprint", "{}"))
        if expected is not None:
            _check_fingerprint(path, stored, json.loads(json.dumps(dict(expected), sort_keys=True)))
        return cls(tensors["patches"], tensors.get("context"), tensors["pooled"], stored)


def _check_fingerprint(path: Path, stored: dict[str, Any], expected: dict[str, Any]) -> None:
    if stored == expected:
        return
    keys = sorted(set(stored) | set(expected))
    diff = ", ".join(
        f"{k}: cached {stored.get(k)!r} vs wanted {expected.get(k)!r}" for k in keys if stored.get(k) != expected.get(k)
    )
    raise CacheMismatchError(
        f"feature cache {path} was extracted under another backbone config ({diff}); delete it or extract the features again"
    )


# ----------------------------------------------------------------------------- extraction


class _ImageDataset(Dataset[torch.Tensor]):
    """Sample i -> float (3, S, S) in [0, 1]; runs in the DataLoader workers."""

    def __init__(self, samples: Sequence[SupportsLoadImage], size: int) -> None:
        self.samples = samples
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        sample = self.samples[i]
        try:
            # a huge image is reduced while it is decoded (JPEG draft) instead of being held at full size
            return image_to_tensor(sample.load_image(max_side=LOAD_SIDE_FACTOR * self.size), self.size)
        except Exception as e:  # name the file whatever went wrong, keep the cause chained
            where = getattr(sample, "image_path", None) or getattr(sample, "path", None) or repr(sample)
            raise ImageLoadError(f"could not load image {where}: {type(e).__name__}: {e}") from e


def default_workers() -> int:
    """DataLoader workers worth starting: they decode images while the backbone computes, which pays only
    with cores to spare (on 2 cores, 0, 1 and 2 workers extract equally fast: `moleflow bench`)."""
    return min(4, (os.cpu_count() or 1) // 4)


def extract_features(
    extractor: FeatureExtractor,
    samples: Sequence[SupportsLoadImage],
    *,
    need_context: bool,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    desc: str = "features",
) -> CachedFeatures:
    """Run the frozen extractor over ``samples`` once; returns CPU :class:`CachedFeatures`.

    ``device``: where the backbone runs (the extractor is moved there); default: where it is.
    ``need_context``: keep the multi-layer ``context`` maps (scale context); CNN backbones only.
    ``dtype``: float32 or float16 storage of patches/context (pooled is always float32).
    """
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    if need_context and extractor.context_dim is None:
        raise ValueError(f"backbone {extractor.config.name!r} has no multi-layer context maps (scale context)")
    if len(samples) == 0:
        raise ValueError("extract_features needs at least one sample")
    dev = torch.device(device) if device is not None else extractor.mean.device
    extractor.to(dev)
    loader = DataLoader(
        _ImageDataset(samples, extractor.image_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
    )
    n, (h, w) = len(samples), extractor.grid
    patches = torch.empty(n, h, w, extractor.embed_dim, dtype=dtype)
    context = torch.empty(n, h, w, extractor.context_dim or 0, dtype=dtype) if need_context else None
    pooled = torch.empty(n, extractor.pooled_dim, dtype=torch.float32)
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        try:
            _run(extractor, loader, dev, patches, context, pooled, bar)
        except ImageLoadError as e:
            # the traceback holds the DataLoader iterator; dropping it lets the workers shut down now
            # instead of stalling a later garbage collection (the message keeps the worker's traceback)
            raise e.with_traceback(None) from e.__cause__
    return CachedFeatures(patches, context, pooled, cache_fingerprint(extractor.config))


def _run(
    extractor: FeatureExtractor,
    loader: DataLoader[torch.Tensor],
    device: torch.device,
    patches: torch.Tensor,
    context: torch.Tensor | None,
    pooled: torch.Tensor,
    bar: tqdm,
) -> None:
    """Fill the preallocated (N, ...) CPU tensors batch by batch."""
    start = 0
    for batch in loader:
        out = extractor(extractor.normalize(batch.to(device, non_blocking=True)))
        stop = start + batch.shape[0]
        patches[start:stop].copy_(out.patches)
        pooled[start:stop].copy_(out.pooled)
        if context is not None and out.context is not None:
            context[start:stop].copy_(out.context)
        start = stop
        bar.update(batch.shape[0])
