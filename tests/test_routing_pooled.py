"""Pooled-covariance routing and patch-Gaussian routing against what unknown-product rejection relies on:
the distance reported for a routed image is its routed product's own (calibrated) distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moleflow.config import RouterConfig
from moleflow.routing import Router

F64 = torch.float64


def _pooled_router() -> Router:
    router = Router(RouterConfig(covariance="pooled"))
    router.add("a", torch.zeros(2, dtype=F64), torch.linalg.inv(torch.diag(torch.tensor([1.0, 9.0], dtype=F64))))
    router.add("c", torch.tensor([-6.0, 0.0], dtype=F64), torch.eye(2, dtype=F64))
    return router


def test_pooled_routing_reports_the_own_distance_unchanged_when_products_come_and_go():
    router = _pooled_router()
    x = torch.tensor([[1.0, 3.0]], dtype=F64)
    index, distance = router.nearest(x)
    assert router.tasks[int(index)] == "a"
    assert distance.item() == pytest.approx(1.0 + 9.0 / 9.0, abs=1e-12)  # x^T diag(1, 1/9) x, a's own precision
    chol_before = router.pooled()[0].clone()

    router.add("b", torch.tensor([0.0, 40.0], dtype=F64), torch.linalg.inv(100.0 * torch.eye(2, dtype=F64)))
    assert not torch.allclose(router.pooled()[0], chol_before)  # the pooled metric did change ...
    index_after, distance_after = router.nearest(x)
    assert router.tasks[int(index_after)] == "a"
    assert distance_after.item() == distance.item()  # ... the reported distance did not
    pooled_precision = torch.cholesky_inverse(router.pooled()[0])
    assert (x @ pooled_precision @ x.T).item() != pytest.approx(distance.item(), rel=1e-3)  # it is not the pooled one

    router.remove("b")
    assert router.nearest(x)[1].item() == distance.item()
    torch.testing.assert_close(router.pooled()[0], chol_before)


def test_pooled_route_is_the_argmin_under_the_mean_covariance_and_the_distance_the_own_one():
    g = torch.Generator().manual_seed(0)
    router = Router(RouterConfig(covariance="pooled"))
    covs = []
    for t in range(4):
        a = torch.randn(5, 5, generator=g, dtype=F64)
        covs.append(a @ a.T + 0.5 * torch.eye(5, dtype=F64))
        router.add(f"t{t}", 2.0 * torch.randn(5, generator=g, dtype=F64), torch.linalg.inv(covs[-1]))
    x = 2.0 * torch.randn(64, 5, generator=g, dtype=F64)
    pooled = torch.linalg.inv(torch.stack(covs).mean(dim=0))
    diff = x[:, None] - router.means[None]
    by_hand = torch.einsum("btg,gh,bth->bt", diff, pooled, diff)
    index, distance = router.nearest(x)
    assert torch.equal(index, by_hand.argmin(dim=1))
    torch.testing.assert_close(router.distances(x), by_hand)
    own = torch.einsum("bg,bgh,bh->b", x - router.means[index], router.precisions[index], x - router.means[index])
    torch.testing.assert_close(distance, own)
    assert not torch.equal(index, Router(RouterConfig(), router.tasks, router.means, router.precisions).route(x))


def test_patch_gaussian_distance_is_the_mean_patch_mahalanobis_distance_under_the_routed_task():
    g = torch.Generator().manual_seed(1)
    router = Router(RouterConfig(feature="patch_gaussian"))
    for t in range(3):
        a = torch.randn(4, 4, generator=g, dtype=F64)
        router.add(f"t{t}", torch.randn(4, generator=g, dtype=F64), torch.linalg.inv(a @ a.T + torch.eye(4, dtype=F64)))
    patches = torch.randn(5, 9, 4, generator=g, dtype=F64) + torch.tensor([0.5, 0.0, -0.5, 1.0], dtype=F64)
    index, distance = router.nearest(patches)
    assert torch.equal(index, router.patch_nll(patches).argmin(dim=1))
    for b in range(5):
        t = int(index[b])
        diff = patches[b] - router.means[t]
        by_hand = torch.einsum("pg,gh,ph->p", diff, router.precisions[t], diff).mean()
        assert distance[b].item() == pytest.approx(by_hand.item(), rel=1e-10)
        nll = router.patch_nll(patches[b : b + 1])[0, t]
        assert distance[b].item() == pytest.approx(2.0 * nll.item() + router.log_dets()[t].item(), rel=1e-10)
    assert (distance > 0).all()


def test_a_patch_gaussian_run_learns_calibrates_and_keeps_its_own_products(tmp_path):
    from moleflow.cli import main
    from moleflow.data.synthetic import render_sample
    from moleflow.detector import Detector
    from tests.helpers import learn_args

    run = tmp_path / "run"
    sets = ("--set", "router.feature=patch_gaussian", "--set", "router.covariance=own")
    assert main(learn_args(run, "stripes=synthetic:stripes", "disc=synthetic:disc", extra=sets)) == 0
    detector = Detector.load(run)
    assert detector.cfg.router.feature == "patch_gaussian"
    for name, record in detector.records.items():
        cal = record.calibration
        assert np.isfinite(cal.unknown_threshold) and cal.unknown_threshold > 0, name
    for kind in ("stripes", "disc"):
        preds = detector.predict([render_sample(kind, "test", 200 + i)[0] for i in range(3)])
        assert [p.product for p in preds] == [kind] * 3
        assert not any(p.unknown for p in preds)
        assert all(0 < p.routing_distance < p.routing_threshold for p in preds)


def test_the_pooled_default_survives_the_run_directory_and_routes_as_computed_by_hand(tiny_run):
    from moleflow.data.synthetic import render_sample
    from moleflow.detector import Detector
    from moleflow.training import routing_features

    detector = Detector.load(tiny_run)  # the offline preset, learned by the CLI
    assert detector.cfg.router.covariance == "pooled"
    router = detector.router
    images = [render_sample(kind, "test", 300 + i, defective=i == 1)[0] for kind in ("stripes", "disc") for i in range(3)]
    preds = detector.predict(images)
    feats = detector.extractor.extract(images)  # what predict routes on
    assert detector.cfg.router.feature == "patch_moments"  # each channel's mean and spread over the grid
    grid = feats.patches.double().cpu().flatten(1, 2).numpy()
    x = torch.from_numpy(np.concatenate([grid.mean(axis=1), grid.std(axis=1, ddof=1)], axis=1))
    torch.testing.assert_close(
        routing_features(detector.model, feats, "patch_moments").double().cpu(), x, rtol=1e-5, atol=1e-5
    )
    means, precisions = router.means.cpu(), router.precisions.cpu()
    # numpy's own LAPACK, as an independent reference (and torch's batched LU, nested in its thread pool, has
    # been seen to spin for minutes on a loaded 2-core machine)
    pooled = torch.from_numpy(np.linalg.inv(np.linalg.inv(precisions.numpy()).mean(axis=0)))
    diff = x[:, None] - means[None]
    route = torch.einsum("btg,gh,bth->bt", diff, pooled, diff).argmin(dim=1)
    own = torch.einsum("btg,tgh,bth->bt", diff, precisions, diff)[torch.arange(len(x)), route]
    assert [p.product for p in preds] == [router.tasks[int(t)] for t in route]
    np.testing.assert_allclose([p.routing_distance for p in preds], own.numpy(), rtol=1e-5)


def test_the_pooled_covariance_after_products_come_and_go_is_that_of_a_router_built_fresh():
    g = torch.Generator().manual_seed(1)
    protos = {}
    for t in range(6):
        a = torch.randn(4, 4, generator=g, dtype=F64)
        protos[f"t{t}"] = (torch.randn(4, generator=g, dtype=F64), torch.linalg.inv(a @ a.T + 0.3 * torch.eye(4, dtype=F64)))
    router = Router(RouterConfig(covariance="pooled"))
    for name in ("t0", "t1", "t2"):
        router.add(name, *protos[name])
    router.pooled()  # summed
    router.remove("t1")
    router.add("t3", *protos["t3"])
    router.pooled()
    router.remove("t0")
    router.add("t4", *protos["t4"])  # not yet summed when t2 goes
    router.remove("t2")
    fresh = Router(RouterConfig(covariance="pooled"))
    for name in router.tasks:
        fresh.add(name, *protos[name])
    assert router.tasks == ["t3", "t4"]
    torch.testing.assert_close(router.pooled()[0], fresh.pooled()[0], rtol=1e-12, atol=1e-12)
    for name in list(router.tasks):
        router.remove(name)
    router.add("t5", *protos["t5"])  # an emptied router starts its sum again
    torch.testing.assert_close(router.pooled()[0], torch.linalg.cholesky(torch.linalg.inv(protos["t5"][1])))
