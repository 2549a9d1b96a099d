"""Non-continual reference methods scored on the same backbone features as MoLE-Flow."""

from moleflow.baselines.patchcore import PatchCoreScorer, greedy_coreset, nearest_neighbours, patchcore_backbone

__all__ = ["PatchCoreScorer", "greedy_coreset", "nearest_neighbours", "patchcore_backbone"]
