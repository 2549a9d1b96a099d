"""A PatchCore-style scorer on precomputed patch features (Roth et al., "Towards Total Recall in
Industrial Anomaly Detection", CVPR 2022).

Non-continual reference: one scorer per task, task id given, fitted on the SAME cached backbone features
``(N, H, W, D)`` the main method trains on, so a comparison isolates the scoring model.

* Memory bank (section 3.2): all training patches, subsampled by greedy k-center coreset selection
  (Algorithm 1). As in the paper, distances for the selection are taken after a random linear projection
  to ``projection_dim`` dimensions (Johnson-Lindenstrauss) to make it cheaper; the bank keeps the
  original features. Selection starts from a seeded random patch, so it is deterministic.
* Patch score (eq. 6): Euclidean distance to the nearest memory-bank patch.
* Image score: the maximum patch score, optionally reweighted as in eq. 7
  ``s = (1 - exp(s*) / sum_{m in N_b(m*)} exp(|m_test* - m|)) * s*`` where ``m_test*`` is the highest-scoring
  test patch, ``m*`` its nearest bank patch and ``N_b(m*)`` the ``b`` bank patches nearest to ``m*``
  (``m*`` included, as in anomalib).

Features (:func:`patchcore_backbone`): a faithful PatchCore next to a MoLE-Flow run takes the run's
backbone, layers and input size, but PatchCore's patch grid: the stride of the finest selected layer, the
coarser layers upsampled bilinearly to it, each layer 3x3-averaged first (sec. 3.1, "locally aware patch
features"); with EfficientNet-Lite2 blocks.2 + blocks.4 at 224 px, 28x28 patches of 48 + 120 channels.

Torch only, no faiss; pairwise distances are computed in chunks so memory stays bounded.
"""

from __future__ import annotations

import torch

from moleflow.config import BackboneConfig, replace

__all__ = ["PatchCoreScorer", "greedy_coreset", "nearest_neighbours", "patchcore_backbone"]

PATCHCORE_CORESET = 0.1  # the paper's 10 % memory bank (1 % and 25 % are its other settings)


def patchcore_backbone(config: BackboneConfig) -> BackboneConfig:
    """The feature config of a faithful PatchCore on ``config``'s backbone, layers, input size and width:
    the finest selected layer's grid (coarser ones upsampled bilinearly) with a 3x3 local average."""
    return replace(config, grid="finest", local_aggregation=3)


def greedy_coreset(patches: torch.Tensor, num: int, projection_dim: int | None = 128, seed: int = 0) -> torch.Tensor:
    """Greedy k-center coreset (PatchCore Algorithm 1): repeatedly add the patch farthest from the set.

    Args:
        patches: ``(P, D)`` patch features.
        num: number of patches to keep, ``1 <= num <= P``.
        projection_dim: if smaller than ``D``, distances are measured after a seeded Gaussian random
            projection ``(D, projection_dim)`` scaled by ``1/sqrt(projection_dim)``; ``None`` = no projection.
        seed: seeds the projection and the starting patch.

    Returns:
        ``(num,)`` int64 indices into ``patches``, all distinct, in selection order.

    The selection is exactly Algorithm 1's; only the update is pruned (Elkan-style triangle inequality):
    a patch ``p`` whose nearest selected centre is ``a`` cannot get closer to the new centre ``c`` when
    ``d(a, c) >= 2 d(p, a)``, since then ``d(p, c) >= d(a, c) - d(p, a) >= d(p, a)``. Only the other patches
    are measured, which late in the selection is a small share of them (worst case ``O(P * num * d)``).
    """
    count = patches.shape[0]
    if not 1 <= num <= count:
        raise ValueError(f"coreset size must be in [1, {count}], got {num}")
    generator = torch.Generator().manual_seed(seed)
    x = patches.float()
    if projection_dim is not None and projection_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        x = x @ proj.to(x.device)
    sq_norms = (x * x).sum(dim=1)
    # Squared distance of every patch to its nearest selected one, that centre's rank, and twice the
    # (unsquared) distance, the pruning threshold. Selected patches are pinned at -1 so they are never
    # picked again, even when duplicates leave all remaining distances at 0, and never measured again.
    min_dist = torch.full((count,), float("inf"), device=x.device)
    reach = torch.full((count,), float("inf"), device=x.device)
    owner = torch.zeros(count, dtype=torch.long, device=x.device)
    centres = x.new_empty(num, x.shape[1])
    centre_sq = x.new_empty(num)
    selected = torch.empty(num, dtype=torch.long, device=x.device)
    current = int(torch.randint(count, (1,), generator=generator))
    for k in range(num):
        selected[k], centres[k], centre_sq[k] = current, x[current], sq_norms[current]
        if k == num - 1:
            break
        c = x[current]
        between = (centre_sq[:k] - 2.0 * (centres[:k] @ c) + sq_norms[current]).clamp_min_(0.0).sqrt_()
        todo = (between[owner] < reach).nonzero().squeeze(1) if k else torch.arange(count, device=x.device)
        dist = sq_norms[todo] - 2.0 * (x[todo] @ c) + sq_norms[current]
        closer = dist < min_dist[todo]
        moved, dist = todo[closer], dist[closer]
        min_dist[moved], owner[moved], reach[moved] = dist, k, 2.0 * dist.clamp_min(0.0).sqrt()
        min_dist[current], reach[current] = -1.0, -1.0
        current = int(torch.argmax(min_dist))
    return selected


def nearest_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, chunk_elements: int = 2**24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance and index of each query's nearest bank row, computed in bounded chunks.

    Args:
        queries: ``(Q, D)``.
        bank: ``(M, D)``.
        chunk_elements: at most this many query-bank distances are held at once.

    Returns:
        ``(distances (Q,), indices (Q,) int64)``.
    """
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} features but the bank has {bank.shape[1]}")
    rows = max(1, chunk_elements // max(1, bank.shape[0]))
    dists, idxs = [], []
    for start in range(0, queries.shape[0], rows):
        chunk = queries[start : start + rows]
        # cdist's fast matrix-product path finds the neighbour; its distance loses precision near 0
        # (|q|^2 - 2 q.m + |m|^2 cancels), so the winner's distance is recomputed directly.
        best = torch.cdist(chunk, bank).argmin(dim=1)
        dists.append(torch.linalg.vector_norm(chunk - bank[best], dim=1))
        idxs.append(best)
    if not dists:
        return queries.new_empty(0), torch.empty(0, dtype=torch.long, device=queries.device)
    return torch.cat(dists), torch.cat(idxs)


def _check_features(features: torch.Tensor, what: str) -> None:
    """Raise unless ``features`` is a 4-D ``(N, H, W, D)`` float tensor with finite values."""
    if features.ndim != 4:
        raise ValueError(f"{what}: expected features of shape (N, H, W, D), got {tuple(features.shape)}")
    if not torch.is_floating_point(features):
        raise ValueError(f"{what}: expected a float tensor, got {features.dtype}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError(f"{what}: features contain NaN or inf")


class PatchCoreScorer:
    """PatchCore memory bank + nearest-neighbour scoring on ``(N, H, W, D)`` patch features.

    Args:
        coreset_ratio: fraction of training patches kept, in (0, 1]; the bank holds
            ``max(1, round(coreset_ratio * N*H*W))`` patches (1.0 keeps all, without selection).
        projection_dim: random-projection size for coreset distances, ``None`` to use full features.
        reweight_neighbours: ``b`` of eq. 7 for the image score; 0 = plain maximum patch score.
        seed: seeds the coreset selection.
        chunk_elements: bound on the number of pairwise distances held in memory at once.
    """

    def __init__(
        self,
        coreset_ratio: float = PATCHCORE_CORESET,
        projection_dim: int | None = 128,
        reweight_neighbours: int = 0,
        seed: int = 0,
        chunk_elements: int = 2**24,
    ) -> None:
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if reweight_neighbours < 0:
            raise ValueError(f"reweight_neighbours must be >= 0, got {reweight_neighbours}")
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.reweight_neighbours = reweight_neighbours
        self.seed = seed
        self.chunk_elements = chunk_elements
        self.memory_bank: torch.Tensor | None = None  # (M, D)

    def coreset_size(self, num_patches: int) -> int:
        """Number of bank patches kept out of ``num_patches``."""
        return min(num_patches, max(1, round(self.coreset_ratio * num_patches)))

    def fit(self, features: torch.Tensor) -> PatchCoreScorer:
        """Build the memory bank from training features ``(N, H, W, D)`` of one task; returns ``self``."""
        _check_features(features, "PatchCoreScorer.fit")
        patches = features.detach().reshape(-1, features.shape[-1])
        num = self.coreset_size(patches.shape[0])
        if num < patches.shape[0]:
            patches = patches[greedy_coreset(patches, num, self.projection_dim, self.seed)]
        self.memory_bank = patches.float().clone()
        return self

    def _bank(self, features: torch.Tensor, what: str) -> torch.Tensor:
        """The fitted bank on ``features``' device, after checking ``features``."""
        if self.memory_bank is None:
            raise RuntimeError(f"{what}: call fit() first")
        _check_features(features, what)
        return self.memory_bank.to(features.device)

    @torch.no_grad()
    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Patch scores ``(B, H, W)``: distance of each patch of ``features (B, H, W, D)`` to the bank."""
        bank = self._bank(features, "PatchCoreScorer.score")
        b, h, w, d = features.shape
        dist, _ = nearest_neighbours(features.reshape(-1, d).float(), bank, self.chunk_elements)
        return dist.reshape(b, h, w)

    @torch.no_grad()
    def image_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Image scores ``(B,)``: max patch score, reweighted by eq. 7 when ``reweight_neighbours > 0``."""
        bank = self._bank(features, "PatchCoreScorer.image_scores")
        b, _, _, d = features.shape
        flat = features.reshape(b, -1, d).float()
        dist, idx = nearest_neighbours(flat.reshape(-1, d), bank, self.chunk_elements)
        dist, idx = dist.reshape(b, -1), idx.reshape(b, -1)
        s_star, arg = dist.max(dim=1)
        if self.reweight_neighbours == 0:
            return s_star
        rows = torch.arange(b, device=features.device)
        m_test = flat[rows, arg]  # (B, D) the most anomalous test patch per image
        m_star = bank[idx[rows, arg]]  # (B, D) its nearest bank patch
        k = min(self.reweight_neighbours, bank.shape[0])
        support = torch.cdist(m_star, bank).topk(k, dim=1, largest=False).indices  # (B, k), m* first
        support_dist = torch.linalg.vector_norm(m_test[:, None, :] - bank[support], dim=-1)  # (B, k)
        weight = 1.0 - torch.exp(s_star - torch.logsumexp(support_dist, dim=1))
        return weight * s_star
