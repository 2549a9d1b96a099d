"""Frozen feature extractor: images -> patch features on a grid (outline 3.2.1).

Aggregation follows PatchCore (Roth et al., CVPR 2022, sec. 3.1):

- CNN: every selected layer map gets a local k x k average (``local_aggregation``, 3 by default; stride 1,
  zero padding, i.e. neighbourhood aggregation), is brought to the patch grid and the layers are
  concatenated along channels. The grid (``grid``) is that of the coarsest selected layer (finer maps are
  adaptive-average-pooled down to it; the offline preset) or that of the finest (coarser maps are upsampled
  bilinearly to it, PatchCore's choice: stride-8 patches from a stride-8 and a stride-16 layer). If the
  concatenated width differs from ``embed_dim`` it is reduced by
  adaptive average pooling over the channel axis (PatchCore's aggregator); e.g. wide_resnet50_2
  layer2 + layer3 = 512 + 1024 = 1536 -> 768 averages adjacent channel pairs, so layer2 keeps 256 and
  layer3 512 of the 768 channels.
- ViT: the patch tokens of every selected block (CLS dropped) are concatenated (4 x 768 = 3072) and
  channel-pooled to ``embed_dim``; with 768 this averages groups of 4 adjacent channels inside each block,
  so every block contributes 192 channels. No local smoothing: attention already mixes the tokens.

``context`` is the raw (unsmoothed, unpooled-channel) concatenation of the CNN layer maps on the grid,
the input of the scale-context module (outline 3.3.3; 512 + 1024 = 1536 for wide_resnet50_2); None for
the ViT. ``pooled`` is the backbone's final-layer image feature (see :mod:`.backbones`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moleflow.config import BackboneConfig, MoleFlowConfig
from moleflow.features.backbones import Backbone, create_backbone
from moleflow.features.folding import fold_batchnorm
from moleflow.precision import autocast

#: Images per backbone call on the CPU: a larger batch's activation maps fall out of the cores' caches
#: and every image gets slower (Lite2, a batch of 32 in micro-batches of 1 / 2 / 4 / 8 / 32: 10.2 / 8.6 /
#: 7.7 / 8.2 / 13.2 ms per image on 2 threads, 15.0 / 14.6 / 14.9 / 18.1 / 23.3 on 1;
#: `benchmarks/inference_stages.py --chunks 1,2,4,8,32`). GPUs take the whole batch at once.
CPU_BACKBONE_CHUNK = 4


@dataclass(frozen=True)
class BackboneFeatures:
    """Output of :class:`FeatureExtractor` for a batch of ``B`` images.

    patches: (B, H, W, D) aggregated patch features, channel-last.
    context: (B, H, W, C) raw multi-layer maps on the patch grid (CNNs), or None (ViT).
    pooled:  (B, G) image-level feature of the backbone's final layer; (B, 0) if the extractor skips it.
    """

    patches: torch.Tensor
    context: torch.Tensor | None
    pooled: torch.Tensor


def image_to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 image (H, W), (H, W, 1) or (H, W, 3) -> float (3, size, size) in [0, 1].

    Grey images are repeated to RGB; any aspect ratio is resized straight to ``size`` x ``size``
    (bilinear, antialiased), as the industrial datasets are square or close to it.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 numpy image, got {type(image).__name__} {getattr(image, 'dtype', '')}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3) or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
    x = torch.tensor(image).permute(2, 0, 1).float().div_(255.0)  # copies: input may be read-only
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
    if x.shape[1:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return x.contiguous()  # bilinear weights are convex: values stay in [0, 1]


def pool_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, H, W, dim) by adaptive average pooling over the channel axis."""
    if x.shape[-1] == dim:
        return x
    b, h, w, c = x.shape
    return F.adaptive_avg_pool1d(x.reshape(b * h * w, 1, c), dim).reshape(b, h, w, dim)


def to_grid(m: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, H_l, W_l) -> (B, C, *grid): adaptive average pooling down, bilinear interpolation up."""
    if tuple(m.shape[-2:]) == tuple(grid):
        return m
    if m.shape[-2] >= grid[0] and m.shape[-1] >= grid[1]:
        return F.adaptive_avg_pool2d(m, grid)
    return F.interpolate(m, size=grid, mode="bilinear", align_corners=False)


def local_average(m: torch.Tensor, kernel: int) -> torch.Tensor:
    """(B, C, H, W) -> same shape: ``kernel`` x ``kernel`` mean with zero padding (PatchCore); 1 = identity."""
    return m if kernel == 1 else F.avg_pool2d(m, kernel, stride=1, padding=kernel // 2)


def cnn_patches(maps: Sequence[torch.Tensor], grid: tuple[int, int], dim: int, kernel: int = 3) -> torch.Tensor:
    """[(B, C_l, H_l, W_l)] -> (B, H, W, dim): local average, resample to ``grid``, concat, channel pool."""
    parts = [to_grid(local_average(m, kernel), grid) for m in maps]
    return pool_channels(torch.cat(parts, dim=1).permute(0, 2, 3, 1), dim)


def cnn_context(maps: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """[(B, C_l, H_l, W_l)] -> (B, H, W, sum C_l): raw maps resampled to ``grid`` and concatenated."""
    return torch.cat([to_grid(m, grid) for m in maps], dim=1).permute(0, 2, 3, 1)


def vit_patches(maps: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """[(B, 768, H, W)] patch tokens of each block -> (B, H, W, dim): concat, channel pool."""
    return pool_channels(torch.cat(list(maps), dim=1).permute(0, 2, 3, 1), dim)


def _join(chunks: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Per-chunk inference tensors -> one ordinary tensor along the batch axis."""
    assert all(c is not None for c in chunks)
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0].clone()  # type: ignore[arg-type, union-attr]


class FeatureExtractor(nn.Module):
    """Frozen backbone + PatchCore-style aggregation; see the module docstring.

    ``preprocess`` turns uint8 images into the normalised batch ``forward`` takes;
    ``extract`` does both. Always in eval mode, never tracks gradients.
    """

    def __init__(self, config: BackboneConfig, pooled: bool = True) -> None:
        """``pooled=False``: skip the backbone's image-level feature (only the ``backbone_pooled`` router uses
        it): the network stops at the deepest selected layer and ``pooled`` is an empty (B, 0) tensor."""
        super().__init__()
        self.config = config
        self.with_pooled = pooled
        self.image_size = int(config.image_size)
        self.backbone: Backbone = create_backbone(config.name, config.layers, self.image_size, config.pretrained)
        width = sum(self.backbone.channels)
        if not 0 < config.embed_dim <= width:
            raise ValueError(
                f"backbone.embed_dim must lie in [1, {width}] (the concatenated width of layers "
                f"{list(config.layers)} of {config.name!r}: {list(self.backbone.channels)}), "
                f"got {config.embed_dim}"
            )
        self._embed_dim = int(config.embed_dim)
        mean, std = self.backbone.mean, self.backbone.std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.memory_format = torch.contiguous_format
        # frozen, so its BatchNorms can live inside the convolutions (one pass less over every map)
        self.folded_norms = fold_batchnorm(self.backbone.model) if self.backbone.kind == "cnn" else 0
        if self.backbone.kind == "cnn":
            # NHWC convolutions: ~1.5x faster on CPU (oneDNN) and the tensor-core layout on GPU; same values
            # up to float rounding (measured by `moleflow bench`, section "optimizations")
            self.set_memory_format(torch.channels_last)
        self._grid = self._probe_grid()
        self._compiled_backbone: Callable | None = None  # the backbone's torch.compile'd forward (compile_backbone)
        super().train(False)

    # ------------------------------------------------------------------ properties

    @property
    def grid(self) -> tuple[int, int]:
        """(H, W) of the patch grid."""
        return self._grid

    @property
    def embed_dim(self) -> int:
        """D, the width of ``patches``."""
        return self._embed_dim

    @property
    def context_dim(self) -> int | None:
        """C, the width of ``context``; None for the ViT (no multi-scale maps)."""
        return sum(self.backbone.channels) if self.backbone.kind == "cnn" else None

    @property
    def pooled_dim(self) -> int:
        """G, the width of ``pooled`` (0 when the extractor skips it)."""
        return self.backbone.pooled_dim if self.with_pooled else 0

    def set_memory_format(self, memory_format: torch.memory_format) -> FeatureExtractor:
        """Layout of the backbone's weights and inputs: ``torch.channels_last`` (CNN default) or
        ``torch.contiguous_format`` (NCHW)."""
        self.memory_format = memory_format
        self.backbone.to(memory_format=memory_format)
        return self

    @property
    def backbone_compiled(self) -> bool:
        """Whether the backbone runs under ``torch.compile`` (:meth:`compile_backbone`)."""
        return self._compiled_backbone is not None

    def compile_backbone(self, enabled: bool = True) -> FeatureExtractor:
        """Run the frozen backbone under ``torch.compile`` (inductor) from the next call on, or eagerly again.

        The features are those of the eager backbone up to float rounding (identical on Lite2 on a CPU:
        inductor calls the same convolution kernels and fuses the elementwise layers around them), and the
        backbone runs faster per image (docs/PERFORMANCE.md, "fourth speed session"). The first call of each
        micro-batch shape compiles it (seconds with inductor's on-disk cache warm, up to a minute cold): worth
        it for a server or a long prediction, not for a handful of images. On a CPU the shapes are the
        micro-batches of 1 .. ``CPU_BACKBONE_CHUNK`` images, each compiled once (static shapes); elsewhere a
        batch's size varies, and torch's automatic dynamic shapes take over from the second size seen (call
        this after moving the extractor to its device).
        """
        if not enabled:
            self._compiled_backbone = None
        elif self._compiled_backbone is None:
            dynamic = False if self.mean.device.type == "cpu" else None
            # the bound forward, not the module: a compiled module would register as a submodule (state_dict keys)
            self._compiled_backbone = torch.compile(self.backbone.forward, dynamic=dynamic)
        return self

    def warm_up(self, max_batch: int) -> None:
        """Run every micro-batch shape a call of up to ``max_batch`` images can produce once (compiles them)."""
        sizes = range(1, min(max_batch, CPU_BACKBONE_CHUNK) + 1) if self.mean.device.type == "cpu" else (1, max_batch)
        s = self.image_size
        for b in sorted(set(sizes)):
            self(torch.zeros(b, 3, s, s, device=self.mean.device))

    # ------------------------------------------------------------------ frozen

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Frozen: stays in eval mode (BatchNorm statistics never update)."""
        return super().train(False)

    # ------------------------------------------------------------------ preprocessing

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float RGB in [0, 1] -> (B, 3, S, S) normalised with the backbone's mean/std."""
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"normalize expects float (B, 3, H, W) RGB in [0, 1], got {tuple(x.shape)} {x.dtype}")
        return (x - self.mean) / self.std

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 images (H, W[, 3]) of any size -> (B, 3, S, S) normalised, on the extractor's device."""
        if len(images) == 0:
            raise ValueError("preprocess needs at least one image")
        batch = torch.stack([image_to_tensor(im, self.image_size) for im in images])
        return self.normalize(batch.to(self.mean.device))

    # ------------------------------------------------------------------ extraction

    def forward(self, x: torch.Tensor) -> BackboneFeatures:
        """(B, 3, S, S) normalised images -> :class:`BackboneFeatures` (patches (B, H, W, D), ...)."""
        s = self.image_size
        if x.ndim != 4 or x.shape[1:] != (3, s, s) or not x.is_floating_point():
            raise ValueError(
                f"expected float images of shape (B, 3, {s}, {s}) normalised by FeatureExtractor.normalize "
                f"(or use FeatureExtractor.preprocess), got {tuple(x.shape)} {x.dtype}"
            )
        with torch.inference_mode():
            chunk = CPU_BACKBONE_CHUNK if x.device.type == "cpu" else x.shape[0]
            parts = [self._features(c) for c in x.split(chunk)]
        # inference tensors cannot be saved for backward; cat (or clone) outside the mode so that
        # downstream trainable modules can take these features as ordinary inputs
        contexts = [c for _, c, _ in parts]
        return BackboneFeatures(
            patches=_join([p for p, _, _ in parts]),
            context=None if contexts[0] is None else _join(contexts),
            pooled=_join([g for _, _, g in parts]),
        )

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(b, 3, S, S) -> (patches, context or None, pooled) of one backbone call."""
        # fp32 leaves any enclosing autocast region alone (moleflow bench runs the GPU end to end under one)
        bf16 = autocast(x.device, "bf16") if self.config.precision == "bf16" else contextlib.nullcontext()
        with bf16:
            run = self._compiled_backbone or self.backbone
            maps, pooled = run(x.contiguous(memory_format=self.memory_format), pooled=self.with_pooled)
        maps = [m.float() for m in maps]  # bf16: aggregate and pool in float32
        pooled = None if pooled is None else pooled.float()
        if pooled is None:
            pooled = x.new_empty(x.shape[0], 0)
        if self.backbone.kind == "cnn":
            patches = cnn_patches(maps, self._grid, self._embed_dim, self.config.local_aggregation)
            return patches, cnn_context(maps, self._grid), pooled
        return vit_patches(maps, self._embed_dim), None, pooled

    def extract(self, images: Sequence[np.ndarray]) -> BackboneFeatures:
        """uint8 images -> features; ``forward(preprocess(images))``."""
        return self(self.preprocess(images))

    def _probe_grid(self) -> tuple[int, int]:
        """Grid of the coarsest (or, ``grid="finest"``, the finest) selected layer, read off one forward pass."""
        probe = torch.zeros(1, 3, self.image_size, self.image_size)
        with torch.inference_mode():
            maps, _ = self.backbone(probe, pooled=False)
        pick = max if self.config.grid == "finest" and self.backbone.kind == "cnn" else min
        h, w = pick((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1])
        return int(h), int(w)


def extractor_for(cfg: MoleFlowConfig) -> FeatureExtractor:
    """The extractor a model of ``cfg`` needs: its backbone, with the image-level feature only for a
    router that routes on it."""
    return FeatureExtractor(cfg.model.backbone, pooled=cfg.router.feature == "backbone_pooled")
