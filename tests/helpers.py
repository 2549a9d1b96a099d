"""Small synthetic fixtures shared by the model-level tests."""

from __future__ import annotations

import torch

from moleflow.config import MoleFlowConfig, apply_overrides, preset
from moleflow.features.cache import CachedFeatures


def tiny_config(name: str = "offline", *extra: str) -> MoleFlowConfig:
    return apply_overrides(
        preset(name),
        [
            "model.backbone.embed_dim=16",
            "model.flow.lora.rank=4",
            "model.flow.coupling_layers=4",
            "train.epochs=3",
            "train.batch_size=8",
            *extra,
        ],
    )


def task_features(
    shift: float, n: int = 24, seed: int = 0, dim: int = 16, grid: int = 4, context_dim: int | None = None
) -> CachedFeatures:
    """Gaussian patch features around ``shift``: tasks with far-apart shifts are easy to route."""
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(n, grid, grid, dim, generator=g) + shift
    context = None if context_dim is None else torch.randn(n, grid, grid, context_dim, generator=g)
    return CachedFeatures(patches, context, patches.mean(dim=(1, 2)) + 0.1 * torch.randn(n, dim, generator=g))
