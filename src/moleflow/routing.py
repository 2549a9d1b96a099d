"""Task prototypes and the Mahalanobis router (outline 3.6).

Each task keeps the mean ``mu_t`` and the precision ``(Sigma_t + reg I)^-1`` of its training images'
routing features (``G``-dim). Statistics are accumulated in a streaming way (Chan et al.'s pairwise
update of mean and scatter, float64), so a task's features never need to sit in memory at once.
An image goes to the task with the smallest (squared) Mahalanobis or Euclidean distance; every image
of a batch is routed on its own. Mahalanobis queries go through :class:`MahalanobisIndex` (exact
argmin with a cheap lower bound, fast at many tasks); :meth:`Router.distances` is the direct float64
evaluation, kept as the reference.

``feature = "patch_gaussian"``: the prototype is the Gaussian ``N(mu_t, Sigma_t)`` of the task's single
patches (N * H * W samples, so the covariance is well determined even for a task of 20 images), and an
image with patches ``x_1..x_n`` goes to the task of lowest mean patch NLL (constant dropped)::

    nll_t = 0.5 * (mean_p (x_p - mu_t)^T P_t (x_p - mu_t) - log|P_t|)
          = 0.5 * (tr(P_t S) + (xbar - mu_t)^T P_t (xbar - mu_t) - log|P_t|)

with ``xbar``, ``S`` the image's own patch mean and (biased) covariance: ``T * G^2`` numbers per image
whatever the grid, as for the image-level router evaluated directly (no index).

``covariance = "pooled"`` (linear discriminant analysis): every task is measured with one precision, the
inverse of the mean of the tasks' covariances (each task weighs the same). A task's own covariance lets a
task of broad spread claim images that fit no task well (defective cells of one solar-cell line going to
the other); one shared metric does not. Queries whiten once (``G^2``) and compare with the whitened means
(``T * G``), so routing stays cheap at many tasks; adding a task inverts its precision once (``G^3``).
Pooling decides the route only: the distance reported for the routed task (:meth:`Router.distance_to`, what
a product's unknown-product threshold is calibrated on) is always measured with that task's own precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moleflow.config import RouterConfig
from moleflow.routing_index import MahalanobisIndex, TaskFactors


@dataclass
class PrototypeAccumulator:
    """Streaming mean and scatter matrix of ``(N, G)`` feature batches."""

    count: int = 0
    mean: torch.Tensor | None = None  # (G,) float64
    scatter: torch.Tensor | None = None  # (G, G) float64, sum of outer products of deviations

    def update(self, features: torch.Tensor) -> None:
        x = features.detach().to(torch.float64).reshape(-1, features.shape[-1])
        if not torch.isfinite(x).all():
            raise ValueError("routing features contain NaN or inf; check the backbone input images")
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(dim=0)
        centred = x - batch_mean
        batch_scatter = centred.T @ centred
        if self.count == 0:
            self.count, self.mean, self.scatter = n, batch_mean, batch_scatter
            return
        total = self.count + n
        delta = batch_mean - self.mean
        self.scatter = self.scatter + batch_scatter + torch.outer(delta, delta) * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total

    def finalize(self, covariance_reg: float, shrinkage: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean (G,), precision (G, G))`` with ``Sigma = S + reg * I``.

        ``shrinkage="none"``: ``S = scatter / (N - 1)`` (the spec). ``"oas"``: the Oracle Approximating
        Shrinkage estimate (Chen et al. 2010, as scikit-learn's ``OAS``) of the covariance, which stays
        well conditioned when a task has fewer images than feature dimensions.
        """
        if self.count < 2:
            raise ValueError(f"a task prototype needs at least 2 training images, got {self.count}")
        if shrinkage == "oas":
            cov = oas_shrink(self.scatter / self.count, self.count)
        elif shrinkage == "none":
            cov = self.scatter / (self.count - 1)
        else:
            raise ValueError(f"unknown covariance shrinkage {shrinkage!r}; use 'none' or 'oas'")
        cov = cov + covariance_reg * torch.eye(cov.shape[0], dtype=cov.dtype)
        chol = torch.linalg.cholesky(cov)
        precision = torch.cholesky_inverse(chol)
        return self.mean.clone(), 0.5 * (precision + precision.T)


def oas_shrink(emp_cov: torch.Tensor, n: int) -> torch.Tensor:
    """OAS shrinkage of a maximum-likelihood covariance ``(G, G)`` towards ``mu * I``, ``mu = tr / G``."""
    p = emp_cov.shape[0]
    mu = torch.trace(emp_cov) / p
    alpha = emp_cov.pow(2).mean()
    num = alpha + mu**2
    den = (n + 1.0) * (alpha - mu**2 / p)
    rho = 1.0 if den <= 0 else min(float(num / den), 1.0)
    return (1.0 - rho) * emp_cov + rho * mu * torch.eye(p, dtype=emp_cov.dtype)


@dataclass
class Router:
    """Prototype router over the learned tasks (in learning order)."""

    cfg: RouterConfig
    tasks: list[str] = field(default_factory=list)
    means: torch.Tensor | None = None  # (T, G) float64
    precisions: torch.Tensor | None = None  # (T, G, G) float64
    _index: MahalanobisIndex | None = field(default=None, init=False, repr=False)  # rebuilt on change
    _factors: dict[str, TaskFactors] = field(default_factory=dict, init=False, repr=False)  # per task, once
    _log_dets: torch.Tensor | None = field(default=None, init=False, repr=False)  # patch_gaussian, rebuilt on change
    # pooled: the sum of the covariances of the tasks in _summed (one (G, G) matrix, not one per task: at 1,000
    # tasks of G = 336 a per-task copy would double the router's memory)
    _covariance_sum: torch.Tensor | None = field(default=None, init=False, repr=False)
    _summed: set[str] = field(default_factory=set, init=False, repr=False)
    _pooled: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)  # rebuilt on change

    def add(self, task: str, mean: torch.Tensor, precision: torch.Tensor) -> None:
        self.extend([task], mean[None], precision[None])

    def extend(self, tasks: list[str], means: torch.Tensor, precisions: torch.Tensor) -> None:
        """Append the prototypes ``means (K, G)``, ``precisions (K, G, G)`` of ``tasks`` in one copy (adding
        K prototypes one at a time copies the whole table K times)."""
        seen = set(self.tasks)
        for task in tasks:
            if task in seen:
                raise ValueError(f"the router already has a prototype for {task!r}")
            seen.add(task)
        means, precisions = means.to(torch.float64), precisions.to(torch.float64)
        if self.means is not None and means.shape[-1] != self.means.shape[-1]:
            raise ValueError(f"prototype of {tasks[0]!r} has dim {means.shape[-1]}, router has {self.means.shape[-1]}")
        self.means = means if self.means is None else torch.cat([self.means, means])
        self.precisions = precisions if self.precisions is None else torch.cat([self.precisions, precisions])
        self.tasks.extend(tasks)
        self._index = self._log_dets = self._pooled = None

    def remove(self, task: str) -> None:
        if task not in self.tasks:
            raise KeyError(f"the router has no prototype for {task!r}; it has {self.tasks}")
        i = self.tasks.index(task)
        keep = [j for j in range(len(self.tasks)) if j != i]
        precision = self.precisions[i]
        self.means, self.precisions = self.means[keep], self.precisions[keep]
        name = self.tasks.pop(i)
        self._factors.pop(name, None)
        if name in self._summed:  # inverted once more, instead of keeping every task's covariance
            self._covariance_sum = self._covariance_sum - _covariance(precision)
            self._summed.discard(name)
        self._index = self._log_dets = self._pooled = None
        if not self.tasks:
            self.means = self.precisions = None
            self._covariance_sum, self._summed = None, set()

    def prototype(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean (G,), precision (G, G))`` of ``task``."""
        i = self.tasks.index(task)
        return self.means[i].clone(), self.precisions[i].clone()

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C (G, G), whitened means (T, G))``: ``C C^T`` = the mean of the tasks' covariances (lower
        Cholesky factor), whitened means ``C^-1 mu_t``; then ``d_t(x) = ||C^-1 x - C^-1 mu_t||^2``."""
        if not self.tasks:
            raise RuntimeError("the router has no tasks yet")
        if self._pooled is None:
            for task, precision in zip(self.tasks, self.precisions, strict=True):
                if task not in self._summed:  # inverted once per task
                    cov = _covariance(precision)
                    self._covariance_sum = cov if self._covariance_sum is None else self._covariance_sum + cov
                    self._summed.add(task)
            cov = self._covariance_sum / len(self.tasks)
            chol = torch.linalg.cholesky(0.5 * (cov + cov.T))
            self._pooled = chol, torch.linalg.solve_triangular(chol, self.means.T, upper=False).T
        return self._pooled

    def log_dets(self) -> torch.Tensor:
        """``log|P_t|`` per task ``(T,)`` float64, computed once per set of tasks."""
        if self._log_dets is None:
            # from the Cholesky factors (the precisions are SPD): batched slogdet runs MKL's threaded LU inside
            # torch's own parallel loop, which was seen to spin forever on a busy 2-core machine
            chol = torch.linalg.cholesky(self.precisions)
            self._log_dets = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(dim=-1)
        return self._log_dets

    def patch_nll(self, patches: torch.Tensor) -> torch.Tensor:
        """Mean patch Gaussian NLL ``(B, T)`` (without ``G/2 log 2 pi``) of ``patches (B, n, G)``."""
        xbar, scatter = _patch_moments(patches.to(self.means.device))
        trace = scatter.flatten(1) @ self.precisions.flatten(1).T  # tr(P_t S_b), P symmetric
        diff = xbar[:, None, :] - self.means[None]  # (B, T, G)
        maha = torch.einsum("btg,tgh,bth->bt", diff, self.precisions, diff)
        return 0.5 * (trace + maha - self.log_dets()[None])

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Squared distances ``(B, T)`` of ``features (B, G)`` to every prototype (``patch_gaussian``: the mean
        patch NLL of ``features (B, n, G)`` under every task)."""
        if not self.tasks:
            raise RuntimeError("the router has no tasks yet")
        if self.cfg.feature == "patch_gaussian":
            return self.patch_nll(features)
        x = features.detach().to(torch.float64)
        diff = x[:, None, :] - self.means[None]  # (B, T, G)
        if self.cfg.metric == "euclidean":
            return diff.pow(2).sum(dim=-1)
        if self.cfg.metric == "mahalanobis" and self.cfg.covariance == "pooled":
            chol, _ = self.pooled()
            return torch.einsum("btg,gh,bth->bt", diff, torch.cholesky_inverse(chol), diff)
        if self.cfg.metric == "mahalanobis":
            return torch.einsum("btg,tgh,bth->bt", diff, self.precisions, diff)
        raise ValueError(f"unknown router metric {self.cfg.metric!r}")

    def index(self, device: torch.device | str | None = None) -> MahalanobisIndex:
        """The Mahalanobis query structure on ``device`` (built once per set of tasks)."""
        if not self.tasks:
            raise RuntimeError("the router has no tasks yet")
        device = torch.device(device) if device is not None else self.means.device
        if self._index is None or self._index.chol.device != device:
            for task, precision in zip(self.tasks, self.precisions, strict=True):
                if task not in self._factors:  # decomposed once per task, not at every rebuild
                    self._factors[task] = TaskFactors.of(precision)  # where the precisions live (GPU: fast)
            factors = [self._factors[t] for t in self.tasks]
            self._index = MahalanobisIndex.from_factors(self.means, factors).to(device)
        return self._index

    def route(self, features: torch.Tensor) -> torch.Tensor:
        """Index into ``self.tasks`` of the nearest prototype per image, ``(B,)`` long."""
        if self.cfg.metric == "euclidean":
            return self.distances(features).argmin(dim=1)
        if not torch.isfinite(features).all():
            raise ValueError("routing features contain NaN or inf; check the backbone input images")
        if self.cfg.feature == "patch_gaussian":
            return self.distances(features).argmin(dim=1).to(features.device)
        if self.cfg.covariance == "pooled":
            chol, white_means = self.pooled()
            x = features.detach().to(device=chol.device, dtype=torch.float64)
            white = torch.linalg.solve_triangular(chol, x.T, upper=False).T  # (B, G)
            return torch.cdist(white, white_means).argmin(dim=1).to(features.device)
        return self.index(features.device).nearest(features.detach())[0]

    def distance_to(self, features: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        """Squared distance ``(B,)`` of each image ``features (B, G)`` to the prototype ``task_index (B,)``,
        always under that task's OWN precision (also when routing pools the covariances): a product's
        unknown-product threshold is calibrated on this distance and must not move when other products are
        added or removed. ``patch_gaussian``: the mean squared Mahalanobis distance of the image's patches
        ``(B, n, G)`` to the task's patch Gaussian, ``2 * nll_t + log|P_t|`` (its mean patch NLL up to the
        task's own constant, so non-negative and on the scale of the image-level distances)."""
        if not self.tasks:
            raise RuntimeError("the router has no tasks yet")
        x = features.detach().to(device=self.means.device, dtype=torch.float64)
        idx = task_index.to(self.means.device)
        if self.cfg.feature == "patch_gaussian":
            precision = self.precisions[idx]  # (B, G, G)
            xbar, scatter = _patch_moments(x)
            diff = xbar - self.means[idx]
            return (scatter * precision).sum(dim=(1, 2)) + torch.einsum("bg,bgh,bh->b", diff, precision, diff)
        diff = x - self.means[idx]
        if self.cfg.metric == "euclidean":
            return diff.pow(2).sum(dim=-1)
        # per routed task, not one (G, G) gathered per image: a batch mostly holds few products
        out = diff.new_empty(diff.shape[0])
        for t in torch.unique(idx).tolist():
            rows = (idx == t).nonzero().squeeze(1)
            d = diff[rows]
            out[rows] = ((d @ self.precisions[t]) * d).sum(dim=-1)
        return out

    def nearest(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index (B,) long, squared distance (B,) float64)`` of the nearest prototype per image."""
        index = self.route(features)
        return index, self.distance_to(features, index)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``means (T, G)`` and ``precisions (T, G, G)``; empty ``(0, 0)`` tensors when no task is left."""
        if not self.tasks:
            return {"means": torch.zeros(0, 0, dtype=torch.float64), "precisions": torch.zeros(0, 0, 0, dtype=torch.float64)}
        return {"means": self.means, "precisions": self.precisions}


def _covariance(precision: torch.Tensor) -> torch.Tensor:
    """The covariance ``(G, G)`` of an SPD ``precision``, by its Cholesky factor."""
    return torch.cholesky_inverse(torch.linalg.cholesky(precision))


def _patch_moments(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``patches (B, n, G)`` -> ``(mean (B, G), biased covariance (B, G, G))``, float64."""
    x = patches.detach().to(torch.float64)
    xbar = x.mean(dim=1)
    centred = x - xbar[:, None]
    return xbar, centred.transpose(1, 2) @ centred / x.shape[1]
