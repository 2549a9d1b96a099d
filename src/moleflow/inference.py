"""Scoring cached features with routing: each image picks its task, a mixed batch runs once per task."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moleflow.config import ScoringConfig
from moleflow.features.cache import CachedFeatures
from moleflow.flow.model import MoLEFlow
from moleflow.routing import Router
from moleflow.scoring import image_scores, patch_scores
from moleflow.training import routing_features


@dataclass
class ScoredBatch:
    task_index: torch.Tensor  # (B,) index into the learned tasks
    patch_scores: torch.Tensor  # (B, H, W)
    image_scores: torch.Tensor  # (B,)


@torch.inference_mode()
def score_features(
    model: MoLEFlow,
    router: Router,
    features: CachedFeatures,
    scoring: ScoringConfig,
    task_index: torch.Tensor | None = None,
) -> ScoredBatch:
    """Score ``features`` (B images). ``task_index`` given: oracle mode; otherwise routed per image."""
    if task_index is None:
        task_index = router.route(routing_features(model, features, router.cfg.feature)).to(features.patches.device)
    b, h, w, _ = features.patches.shape
    scores = features.patches.new_empty(b, h, w)
    for t in torch.unique(task_index).tolist():
        rows = (task_index == t).nonzero().squeeze(1)
        group = features[rows]
        out = model(group.patches, router.tasks[t], group.context)
        scores[rows] = patch_scores(out.z, out.logdet)
    if not torch.isfinite(scores).all():
        raise FloatingPointError("non-finite anomaly scores: the input features contain NaN/inf or the model diverged")
    return ScoredBatch(task_index, scores, image_scores(scores, scoring))
