"""Patch scores -> anomaly maps at input resolution -> image scores (outline 3.7.3, notes "Score").

``patch_score = 0.5 * |z|^2 - log|det J|`` (see ``moleflow.losses`` for the constant left out).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moleflow.config import ScoringConfig


def patch_scores(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """``z (B, H, W, D)``, ``logdet (B, H, W)`` -> ``(B, H, W)``; higher = more anomalous."""
    return 0.5 * z.pow(2).sum(dim=-1) - logdet


def aggregate(scores: torch.Tensor, mode: str = "top_k", top_k: int = 3) -> torch.Tensor:
    """Image scores ``(B,)`` from patch scores ``(B, H, W)``: mean of the top-k, mean, or max."""
    flat = scores.flatten(1)
    if mode == "top_k":
        return flat.topk(min(top_k, flat.shape[1]), dim=1).values.mean(dim=1)
    if mode == "mean":
        return flat.mean(dim=1)
    if mode == "max":
        return flat.amax(dim=1)
    raise ValueError(f"unknown aggregation {mode!r}; use 'top_k', 'mean' or 'max'")


def gaussian_kernel1d(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``maps (B, H, W)`` with edge-replicate padding; ``sigma <= 0``: unchanged."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.dtype, maps.device)
    r = k.numel() // 2
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x[:, 0]


def anomaly_maps(scores: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Patch scores ``(B, h, w)`` -> maps ``(B, H, W)`` at ``size``: bilinear upsampling, then smoothing."""
    up = F.interpolate(scores[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(up, sigma)


def image_scores(scores: torch.Tensor, cfg: ScoringConfig) -> torch.Tensor:
    return aggregate(scores, cfg.aggregation, cfg.top_k)
