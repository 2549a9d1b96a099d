"""Exact nearest-prototype search for the router, fast at many tasks (issue: routing cost vs tasks).

The router's answer is ``argmin_t d_t(x)`` with ``d_t(x) = (x - mu_t)^T P_t (x - mu_t)`` over ``T`` tasks
with ``G x G`` precisions ``P_t``. Evaluated directly that reads ``T * G^2`` numbers per query (226 MB in
float64 at T = 1000, G = 168), which bounds a single image's routing time by memory bandwidth. This
index gives the same argmin while touching far less:

1. Cholesky form. ``P_t = L_t L_t^T``, so ``d_t = ||L_t^T (x - c) - L_t^T (mu_t - c)||^2``: one matmul
   of the centred query against ``[L_1 | ... | L_T]`` (float32, ``c`` = mean of the prototypes, which
   keeps the two terms small and their difference accurate).
2. Lower bound, then exact distances only where needed. With the eigenpairs ``(lam_i, v_i)`` of ``P_t``
   in ascending order and ``k`` kept, for ``delta = x - mu_t``::

       d_t = sum_i lam_i (v_i^T delta)^2
           >= lam_{k+1} ||delta||^2 - sum_{i<=k} (lam_{k+1} - lam_i) (v_i^T delta)^2  =: lb_t

   (every dropped eigenvalue is at least ``lam_{k+1}``). ``lb_t`` costs ``O(k G)`` per task instead of
   ``O(G^2)``. A shrunk covariance (OAS) has a few large eigenvalues over a flat floor, so its
   precision has ``k`` small eigenvalues over a flat top and the bound is tight. The exact distance is
   computed for the task with the smallest bound; every task whose bound exceeds that distance (plus a
   rounding margin) cannot win and is skipped; the rest are computed exactly. The result equals the
   exhaustive argmin up to float32 rounding of near-ties.

Euclidean routing needs no index (``T * G`` numbers per query).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BOUND_RANK = 16  # k: eigen-directions kept exactly in the lower bound
_MARGIN = 1e-4  # relative margin for float32 rounding when comparing bounds with distances
EXHAUSTIVE_BELOW = 1 << 20  # T * G^2 up to which every task is evaluated exactly (4 MB of factors)


@dataclass(frozen=True)
class TaskFactors:
    """What the index needs of one task's precision ``P (G, G)``, computed once per task (float64)."""

    chol: torch.Tensor  # (G, G) lower triangular, P = chol @ chol.T
    basis: torch.Tensor  # (G, k) columns sqrt(lam_{k+1} - lam_i) v_i for the k smallest eigenpairs
    floor: float  # lam_{k+1}

    @classmethod
    def of(cls, precision: torch.Tensor, bound_rank: int = BOUND_RANK) -> TaskFactors:
        g = precision.shape[0]
        k = max(0, min(bound_rank, g - 1))
        evals, evecs = torch.linalg.eigh(precision)  # ascending
        floor = evals[k]
        weights = (floor - evals[:k]).clamp_min(0).sqrt()
        return cls(torch.linalg.cholesky(precision), evecs[:, :k] * weights, float(floor))


@dataclass
class MahalanobisIndex:
    """Query structure over ``T`` tasks: prototype means and each task's :class:`TaskFactors`."""

    centre: torch.Tensor  # (G,) float32, mean of the prototypes
    chol: torch.Tensor  # (G, T*G) float32, column block t = L_t with P_t = L_t L_t^T
    chol_means: torch.Tensor  # (T, G) float32, L_t^T (mu_t - c)
    means: torch.Tensor  # (T, G) float32, mu_t - c
    mean_sq: torch.Tensor  # (T,) float32, ||mu_t - c||^2
    floor: torch.Tensor  # (T,) float32, lam_{k+1} of P_t
    bound_basis: torch.Tensor  # (G, T*k) float32, column block t = TaskFactors.basis of task t
    bound_means: torch.Tensor  # (T, k) float32, bound_basis_t^T (mu_t - c)

    @property
    def num_tasks(self) -> int:
        return self.means.shape[0]

    @classmethod
    def build(cls, means: torch.Tensor, precisions: torch.Tensor, bound_rank: int = BOUND_RANK) -> MahalanobisIndex:
        """From ``means (T, G)`` and ``precisions (T, G, G)``."""
        return cls.from_factors(means, [TaskFactors.of(p, bound_rank) for p in precisions])

    @classmethod
    def from_factors(cls, means: torch.Tensor, factors: list[TaskFactors]) -> MahalanobisIndex:
        """Assemble the index (cheap: the per-task decompositions are already done)."""
        t, g = means.shape
        means = means.to(torch.float64)
        centre = means.mean(dim=0)
        centred = means - centre
        chol = torch.stack([f.chol for f in factors]).to(means)  # (T, G, G)
        basis = torch.stack([f.basis for f in factors]).to(means)  # (T, G, k)
        k = basis.shape[2]
        f32 = torch.float32
        return cls(
            centre=centre.to(f32),
            chol=chol.permute(1, 0, 2).reshape(g, t * g).to(f32).contiguous(),
            chol_means=torch.einsum("tgh,tg->th", chol, centred).to(f32),
            means=centred.to(f32),
            mean_sq=centred.pow(2).sum(dim=1).to(f32),
            floor=torch.tensor([f.floor for f in factors], dtype=f32, device=means.device),
            bound_basis=basis.permute(1, 0, 2).reshape(g, t * k).to(f32).contiguous(),
            bound_means=torch.einsum("tgk,tg->tk", basis, centred).to(f32),
        )

    def to(self, device: torch.device | str) -> MahalanobisIndex:
        return MahalanobisIndex(**{f: getattr(self, f).to(device) for f in self.__dataclass_fields__})

    # ------------------------------------------------------------------ queries

    def exact(self, x: torch.Tensor, tasks: torch.Tensor | None = None) -> torch.Tensor:
        """Squared distances ``(B, T')`` of centred queries ``x (B, G)`` to ``tasks`` (all if None)."""
        g = x.shape[1]
        chol, offsets = self.chol, self.chol_means
        if tasks is not None:
            chol = chol.view(g, self.num_tasks, g)[:, tasks].reshape(g, -1)
            offsets = offsets[tasks]
        y = (x @ chol).view(x.shape[0], -1, g)
        return (y - offsets).pow(2).sum(dim=-1)

    def exact_pairs(self, x: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """``d_{tasks[b]}(x_b)`` for centred ``x (B, G)`` and one task per query ``tasks (B,)``."""
        g = x.shape[1]
        chol = self.chol.view(g, self.num_tasks, g)[:, tasks]  # (G, B, G)
        y = torch.einsum("bg,gbh->bh", x, chol)
        return (y - self.chol_means[tasks]).pow(2).sum(dim=-1)

    def lower_bounds(self, x: torch.Tensor) -> torch.Tensor:
        """``lb (B, T) <= d`` for centred queries ``x (B, G)``; ``O(T k G)`` per query."""
        b = x.shape[0]
        sq = x.pow(2).sum(dim=1, keepdim=True) - 2 * x @ self.means.T + self.mean_sq  # ||x - mu_t||^2
        k = self.bound_means.shape[1]
        if k == 0:
            return self.floor * sq
        proj = (x @ self.bound_basis).view(b, self.num_tasks, k) - self.bound_means
        return self.floor * sq - proj.pow(2).sum(dim=-1)

    def nearest(self, features: torch.Tensor, exhaustive_below: int = EXHAUSTIVE_BELOW) -> tuple[torch.Tensor, int]:
        """``(argmin_t d_t (B,), number of tasks evaluated exactly)`` for ``features (B, G)``.

        Up to ``exhaustive_below`` numbers of ``T * G^2`` every task is evaluated (bounds would cost
        more than they save); above, the lower bounds prune.
        """
        x = features.to(self.chol.dtype) - self.centre
        if self.chol.numel() <= exhaustive_below:
            return self.exact(x).argmin(dim=1), self.num_tasks
        bounds = self.lower_bounds(x)  # (B, T)
        best = self.exact_pairs(x, bounds.argmin(dim=1))  # (B,) a distance every query can reach
        scale = self.floor * (x.pow(2).sum(dim=1, keepdim=True) + self.mean_sq) + best[:, None]
        alive = bounds <= best[:, None] + _MARGIN * scale  # (B, T) tasks that may still win
        candidates = alive.any(dim=0).nonzero().squeeze(1)
        dist = self.exact(x, candidates)  # (B, C)
        dist = dist.masked_fill(~alive[:, candidates], float("inf"))
        return candidates[dist.argmin(dim=1)], int(candidates.numel())
