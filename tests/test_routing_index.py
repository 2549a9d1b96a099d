"""MahalanobisIndex: the same argmin as the direct float64 evaluation, with far fewer tasks evaluated."""

import pytest
import torch

from moleflow.config import RouterConfig
from moleflow.routing import PrototypeAccumulator, Router
from moleflow.routing_index import MahalanobisIndex

G = 24


def _prototypes(tasks: int, seed: int = 0, images: int = 40, spread: float = 3.0, shrinkage: str = "oas"):
    """OAS-shrunk prototypes of tasks whose images vary along a few directions; returns (router, samples)."""
    gen = torch.Generator().manual_seed(seed)
    router = Router(RouterConfig(metric="mahalanobis", shrinkage=shrinkage))
    samples = []
    for t in range(tasks):
        centre = spread * torch.randn(G, generator=gen, dtype=torch.float64)
        directions = torch.randn(4, G, generator=gen, dtype=torch.float64)
        x = centre + torch.randn(images, 4, generator=gen, dtype=torch.float64) @ directions
        x = x + 0.3 * torch.randn(images, G, generator=gen, dtype=torch.float64)
        acc = PrototypeAccumulator()
        acc.update(x)
        router.add(f"t{t}", *acc.finalize(1e-5, shrinkage))
        samples.append(x)
    return router, torch.cat(samples)


def test_exact_distances_and_lower_bounds_against_the_reference():
    router, x = _prototypes(12)
    index = MahalanobisIndex.build(router.means, router.precisions, bound_rank=4)
    reference = router.distances(x)  # (N, T) float64
    centred = x.float() - index.centre
    torch.testing.assert_close(index.exact(centred).double(), reference, rtol=1e-4, atol=1e-3)
    bounds = index.lower_bounds(centred).double()
    assert (bounds <= reference * (1 + 1e-4) + 1e-3).all()
    assert (bounds > 0.2 * reference).float().mean() > 0.5  # informative, not trivially 0
    pairs = torch.randint(0, 12, (len(x),), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        index.exact_pairs(centred, pairs).double(), reference.gather(1, pairs[:, None])[:, 0], rtol=1e-4, atol=1e-3
    )


@pytest.mark.parametrize("bound_rank, shrinkage", [(0, "oas"), (4, "oas"), (16, "oas"), (G, "oas"), (4, "none")])
def test_nearest_equals_the_exhaustive_argmin(bound_rank, shrinkage):
    """Also with the spec's unshrunk covariance: fewer images (20) than dims would make it singular, so the
    1e-5 ridge leaves precisions with condition numbers near 1e6."""
    router, x = _prototypes(30, seed=2, images=20 if shrinkage == "none" else 40, shrinkage=shrinkage)
    queries = torch.cat([x, 10 * torch.randn(50, G, dtype=torch.float64)])  # near tasks and far from all
    index = MahalanobisIndex.build(router.means, router.precisions, bound_rank=bound_rank)
    nearest, evaluated = index.nearest(queries, exhaustive_below=0)
    assert torch.equal(nearest, router.distances(queries).argmin(dim=1))
    assert 1 <= evaluated <= 30
    assert torch.equal(index.nearest(queries)[0], nearest)  # the exhaustive path (few tasks) agrees


def test_single_queries_evaluate_few_tasks_exactly():
    router, x = _prototypes(60, seed=3)
    index = router.index()
    counts = [index.nearest(x[i : i + 1], exhaustive_below=0)[1] for i in range(0, len(x), 97)]
    assert max(counts) < 10  # out of 60


def test_router_rebuilds_its_index_when_tasks_change():
    router, x = _prototypes(3, seed=4)
    first = router.index()
    assert router.index() is first
    acc = PrototypeAccumulator()
    acc.update(x[:40] + 100.0)
    router.add("far", *acc.finalize(1e-5, "oas"))
    assert router.index() is not first and router.index().num_tasks == 4
    assert (router.route(x[:40] + 100.0) == 3).all()
    kept = router._factors["t0"]
    router.remove("far")
    assert router.index().num_tasks == 3
    assert set(router._factors) == {"t0", "t1", "t2"} and router._factors["t0"] is kept  # decomposed once
    assert torch.equal(router.route(x), router.distances(x).argmin(dim=1))
    with pytest.raises(ValueError, match="NaN"):
        router.route(torch.full((1, G), float("nan")))
