"""Streaming prototypes and the Mahalanobis router."""

import numpy as np
import pytest
import torch

from moleflow.config import RouterConfig
from moleflow.routing import PrototypeAccumulator, Router


def test_streaming_statistics_equal_batch_statistics():
    x = torch.randn(101, 6, dtype=torch.float64) * torch.arange(1, 7) + 3
    acc = PrototypeAccumulator()
    for chunk in torch.split(x, [7, 30, 1, 63]):
        acc.update(chunk)
    mean, precision = acc.finalize(covariance_reg=1e-5)
    cov = np.cov(x.numpy(), rowvar=False) + 1e-5 * np.eye(6)
    np.testing.assert_allclose(mean.numpy(), x.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(precision.numpy(), np.linalg.inv(cov), rtol=1e-8)


def test_prototype_needs_two_images_and_finite_features():
    acc = PrototypeAccumulator()
    acc.update(torch.randn(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        acc.finalize(1e-5)
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.tensor([[float("nan"), 0.0, 0.0]]))


def test_mahalanobis_distance_by_hand_and_metric_choice():
    router = Router(RouterConfig(metric="mahalanobis"))
    router.add("a", torch.zeros(2), torch.diag(torch.tensor([1.0, 1 / 100.0])))
    router.add("b", torch.tensor([3.0, 0.0]), torch.eye(2))
    x = torch.tensor([[0.0, 9.0]])  # to a: 81/100 = 0.81 ; to b: 9 + 81 = 90
    torch.testing.assert_close(router.distances(x), torch.tensor([[0.81, 90.0]], dtype=torch.float64))
    assert router.route(x).tolist() == [0]
    euclid = Router(RouterConfig(metric="euclidean"), ["a", "b"], router.means, router.precisions)
    assert euclid.route(torch.tensor([[2.0, 9.0]])).tolist() == [1]  # 85 vs 82


def test_router_separates_anisotropic_tasks_where_euclidean_fails():
    g = torch.Generator().manual_seed(0)
    # task a: spread along x; task b: spread along y; centres close together
    a = torch.randn(500, 2, generator=g) * torch.tensor([5.0, 0.2])
    b = torch.randn(500, 2, generator=g) * torch.tensor([0.2, 5.0]) + torch.tensor([1.0, 0.0])
    maha = Router(RouterConfig(metric="mahalanobis"))
    for name, feats in (("a", a), ("b", b)):
        acc = PrototypeAccumulator()
        acc.update(feats)
        maha.add(name, *acc.finalize(1e-5))
    test_a = torch.randn(200, 2, generator=g) * torch.tensor([5.0, 0.2])
    accuracy = (maha.route(test_a) == 0).double().mean().item()
    assert accuracy > 0.95
    euclid = Router(RouterConfig(metric="euclidean"), maha.tasks, maha.means, maha.precisions)
    assert (euclid.route(test_a) == 0).double().mean().item() < accuracy - 0.2


def test_remove_task():
    router = Router(RouterConfig())
    for i, name in enumerate("abc"):
        router.add(name, torch.full((2,), float(i)), torch.eye(2))
    router.remove("b")
    assert router.tasks == ["a", "c"]
    assert router.route(torch.tensor([[2.0, 2.0]])).tolist() == [1]


def test_oas_shrinkage_matches_scikit_learn_and_helps_with_few_images():
    from sklearn.covariance import OAS

    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 20, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 20, dtype=torch.float64)
    acc = PrototypeAccumulator()
    for chunk in torch.split(x, 5):
        acc.update(chunk)
    _, precision = acc.finalize(covariance_reg=0.0, shrinkage="oas")
    expected = np.linalg.inv(OAS(assume_centered=False).fit(x.numpy()).covariance_)
    np.testing.assert_allclose(precision.numpy(), expected, rtol=1e-8)
    _, plain = acc.finalize(covariance_reg=1e-5)
    # 12 images in 20 dims: the plain estimate is near-singular, the shrunk one is not
    assert torch.linalg.cond(plain) > 1e4 * torch.linalg.cond(precision)


def test_patch_gaussian_nll_by_hand():
    router = Router(RouterConfig(feature="patch_gaussian"))
    router.add("a", torch.zeros(2), torch.diag(torch.tensor([1.0, 0.25])))  # Sigma = diag(1, 4)
    router.add("b", torch.tensor([0.0, 2.0]), torch.eye(2))
    patches = torch.tensor([[[1.0, 0.0], [-1.0, 2.0]]])  # one image, two patches
    # a: patch Mahalanobis 1 and 1 + 4/4 = 2, mean 1.5; log|P| = log 0.25  -> 0.5 * (1.5 - log 0.25)
    # b: patch Mahalanobis 1 + 4 = 5 and 1 + 0 = 1, mean 3; log|P| = 0    -> 0.5 * 3
    expected = torch.tensor([[0.5 * (1.5 - np.log(0.25)), 1.5]], dtype=torch.float64)
    torch.testing.assert_close(router.distances(patches), expected)
    assert router.route(patches).tolist() == [0]
    with pytest.raises(ValueError, match="NaN"):
        router.route(torch.full((1, 2, 2), float("nan")))


def test_patch_gaussian_routes_by_patch_distribution_where_image_means_carry_nothing():
    from moleflow.features.cache import CachedFeatures
    from moleflow.flow.model import MoLEFlow
    from moleflow.training import ContinualTrainer, routing_features
    from tests.helpers import tiny_config

    g = torch.Generator().manual_seed(0)

    def images(n, axis):  # 4x4 patches spread along one channel; every image's own patch mean is exactly 0
        x = torch.randn(n, 4, 4, 16, generator=g) * 0.1
        x[..., axis] += 3.0 * torch.randn(n, 4, 4, generator=g)
        return x - x.mean(dim=(1, 2), keepdim=True)

    def feats(x):
        return CachedFeatures(x, None, x.mean(dim=(1, 2)))

    cfg = tiny_config("offline", "router.feature=patch_gaussian", "router.covariance=own")
    trainer = ContinualTrainer(MoLEFlow(cfg.model), Router(cfg.router), cfg)
    train = {"a": feats(images(30, 0)), "b": feats(images(30, 1))}
    for name, f in train.items():
        trainer.model.add_task(name)
        trainer.add_prototype(name, f)
    a = train["a"].patches
    torch.testing.assert_close(trainer.router.means[0], a.reshape(-1, 16).mean(0).double())  # every patch counted
    test_a, test_b = feats(images(20, 0)), feats(images(20, 1))
    routed = [trainer.router.route(routing_features(trainer.model, t, "patch_gaussian")) for t in (test_a, test_b)]
    assert routed[0].tolist() == [0] * 20 and routed[1].tolist() == [1] * 20
    # what an image-level mean router would see: one and the same vector for every image of both tasks
    mean_a, mean_b = (routing_features(trainer.model, t, "patch_mean") for t in (test_a, test_b))
    torch.testing.assert_close(mean_a, mean_b, atol=1e-5, rtol=0)


def test_patch_gaussian_needs_the_mahalanobis_metric():
    from moleflow.config import ConfigError
    from tests.helpers import tiny_config

    with pytest.raises(ConfigError, match="patch_gaussian"):
        tiny_config("offline", "router.feature=patch_gaussian", "router.metric=euclidean")


def test_pooled_covariance_is_the_mean_of_the_task_covariances():
    cov_a, cov_b = torch.diag(torch.tensor([1.0, 9.0])), torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    router = Router(RouterConfig(covariance="pooled"))
    router.add("a", torch.zeros(2), torch.linalg.inv(cov_a))
    router.add("b", torch.tensor([4.0, 0.0]), torch.linalg.inv(cov_b))
    pooled = torch.tensor([[2.0, 0.5], [0.5, 6.0]], dtype=torch.float64)  # (cov_a + cov_b) / 2
    x = torch.tensor([[1.0, 2.0], [3.5, -1.0]])
    diff = x.double()[:, None] - router.means[None]
    expected = torch.einsum("btg,gh,bth->bt", diff, torch.linalg.inv(pooled), diff)
    torch.testing.assert_close(router.distances(x), expected)
    assert router.route(x).tolist() == expected.argmin(dim=1).tolist() == [0, 1]
    router.remove("a")  # the pooled metric follows the remaining tasks
    router.add("c", torch.tensor([0.0, 3.0]), torch.eye(2, dtype=torch.float64))
    diff = x.double()[:, None] - router.means[None]
    pooled = (cov_b.double() + torch.eye(2, dtype=torch.float64)) / 2
    torch.testing.assert_close(router.distances(x), torch.einsum("btg,gh,bth->bt", diff, torch.linalg.inv(pooled), diff))
    with pytest.raises(ValueError, match="NaN"):
        router.route(torch.tensor([[float("nan"), 0.0]]))


def test_pooled_metric_keeps_a_broad_task_from_claiming_outliers():
    # task a: tight; task b: broad. An outlier of a (far along the tight axis) is nearer b under b's own
    # broad covariance, but nearer a under the shared metric (where the mean difference decides)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(400, 2, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(400, 2, generator=g, dtype=torch.float64) * 3.0 + torch.tensor([6.0, 0.0], dtype=torch.float64)
    routers = {c: Router(RouterConfig(covariance=c)) for c in ("own", "pooled")}
    for name, feats in (("a", a), ("b", b)):
        acc = PrototypeAccumulator()
        acc.update(feats)
        for r in routers.values():
            r.add(name, *acc.finalize(1e-5))
    outlier = torch.tensor([[2.0, 2.5]])
    assert routers["own"].route(outlier).tolist() == [1]
    assert routers["pooled"].route(outlier).tolist() == [0]


def test_pooled_covariance_needs_image_level_mahalanobis():
    from moleflow.config import ConfigError
    from tests.helpers import tiny_config

    for bad in ("router.metric=euclidean", "router.feature=patch_gaussian"):
        with pytest.raises(ConfigError, match="pooled"):
            tiny_config("offline", "router.covariance=pooled", bad)
