"""Scoring cached features with routing: each image picks its task, a mixed batch runs once per task."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moleflow.config import ScoringConfig
from moleflow.features.cache import CachedFeatures
from moleflow.flow.model import MoLEFlow
from moleflow.precision import autocast
from moleflow.routing import Router
from moleflow.scoring import image_scores, patch_scores
from moleflow.training import routing_features


@dataclass
class ScoredBatch:
    """Scores of ``B`` images, each under the task in ``task_index``."""

    task_index: torch.Tensor  # (B,) long, index into the router's tasks
    patch_scores: torch.Tensor  # (B, H, W)
    image_scores: torch.Tensor  # (B,)
    distances: torch.Tensor  # (B,) float64, squared routing distance to the prototype of task_index

    def __len__(self) -> int:
        return int(self.task_index.shape[0])

    def __getitem__(self, rows: slice | torch.Tensor | list[int]) -> ScoredBatch:
        return ScoredBatch(self.task_index[rows], self.patch_scores[rows], self.image_scores[rows], self.distances[rows])

    def cpu(self) -> ScoredBatch:
        return ScoredBatch(*(t.cpu() for t in (self.task_index, self.patch_scores, self.image_scores, self.distances)))

    @staticmethod
    def cat(parts: list[ScoredBatch]) -> ScoredBatch:
        fields = ("task_index", "patch_scores", "image_scores", "distances")
        return ScoredBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))


@torch.inference_mode()
def score_features(
    model: MoLEFlow,
    router: Router,
    features: CachedFeatures,
    scoring: ScoringConfig,
    task_index: torch.Tensor | None = None,
) -> ScoredBatch:
    """Score ``features`` (B images). ``task_index`` given: oracle mode; otherwise routed per image.

    The images routed to one task form one group that runs through that task's adapters once.
    """
    route_in = routing_features(model, features, router.cfg.feature)
    if task_index is None:
        task_index, distances = router.nearest(route_in)
        task_index = task_index.to(features.patches.device)
    else:
        task_index = task_index.to(features.patches.device)
        distances = router.distance_to(route_in, task_index)
    b, h, w, _ = features.patches.shape
    scores = features.patches.new_empty(b, h, w)
    for t in torch.unique(task_index).tolist():
        rows = (task_index == t).nonzero().squeeze(1)
        group = features[rows]
        with autocast(group.patches.device, scoring.precision):  # z, logdet stay float32
            out = model(group.patches, router.tasks[t], group.context)
        scores[rows] = patch_scores(out.z, out.logdet)
    if not torch.isfinite(scores).all():
        raise FloatingPointError("non-finite anomaly scores: the input features contain NaN/inf or the model diverged")
    return ScoredBatch(task_index, scores, image_scores(scores, scoring), distances.cpu())
