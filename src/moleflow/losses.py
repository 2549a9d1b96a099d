"""Training objective (outline 3.5): patch NLL, tail-aware loss and the regularisers.

Conventions, used consistently everywhere:

- ``patch_nll = 0.5 * |z|^2 - log|det J| + (D/2) * log(2 pi)`` is the true negative log-likelihood of
  a patch in nats (standard normal base density).
- ``patch_score = 0.5 * |z|^2 - log|det J|`` (``moleflow.scoring``) drops the constant; it ranks
  patches identically and is what DESIGN.md calls the patch score.
- The constant does not change the tail selection or any gradient; it only makes the loss a real NLL.
"""

from __future__ import annotations

import math

import torch


def patch_nll(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """``z (B, H, W, D)``, ``logdet (B, H, W)`` -> NLL per patch ``(B, H, W)`` in nats."""
    dim = z.shape[-1]
    return 0.5 * z.pow(2).sum(dim=-1) - logdet + 0.5 * dim * math.log(2.0 * math.pi)


def tail_mean(nll: torch.Tensor, top_fraction: float, scope: str = "per_image") -> torch.Tensor:
    """Mean of the top-k% of ``nll (B, H, W)``.

    ``per_image``: the top ``ceil(k * H * W)`` patches of each image, averaged over images (outline).
    ``batch``: the top ``max(1, floor(k * B * H * W))`` patches of the whole batch (v5 code).
    """
    if scope == "per_image":
        flat = nll.flatten(1)
        k = max(1, math.ceil(top_fraction * flat.shape[1]))
        return flat.topk(k, dim=1).values.mean()
    if scope == "batch":
        flat = nll.flatten()
        k = max(1, int(top_fraction * flat.numel()))
        return flat.topk(k).values.mean()
    raise ValueError(f"unknown tail scope {scope!r}; use 'per_image' or 'batch'")


def tail_aware_loss(nll: torch.Tensor, tail_weight: float, top_fraction: float, scope: str = "per_image") -> torch.Tensor:
    """``(1 - lambda) * mean(nll) + lambda * tail_mean(nll)`` for ``nll (B, H, W)`` (see :func:`tail_mean`)."""
    mean = nll.mean()
    if tail_weight == 0.0:
        if scope not in ("per_image", "batch"):
            raise ValueError(f"unknown tail scope {scope!r}; use 'per_image' or 'batch'")
        return mean
    return (1.0 - tail_weight) * mean + tail_weight * tail_mean(nll, top_fraction, scope)


def logdet_penalty(logdet: torch.Tensor) -> torch.Tensor:
    """``mean over patches of logdet^2`` (the form of the authors' public code for lambda_logdet).

    It discourages the flow from buying likelihood with ever larger volume changes.
    """
    return logdet.pow(2).mean()
