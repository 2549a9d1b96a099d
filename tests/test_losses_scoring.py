"""Tail-aware loss, NLL constant and image-score aggregation against hand-computed values."""

import math

import pytest
import torch

from moleflow.losses import logdet_penalty, patch_nll, tail_aware_loss
from moleflow.scoring import aggregate, anomaly_maps, gaussian_blur, patch_scores


def test_patch_nll_is_the_standard_normal_nll_minus_logdet():
    z = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]]])  # (1, 1, 2, 2)
    logdet = torch.tensor([[[0.5, -1.0]]])
    expected = torch.tensor([[[0.5 * 5 - 0.5 + math.log(2 * math.pi), 0.0 + 1.0 + math.log(2 * math.pi)]]])
    torch.testing.assert_close(patch_nll(z, logdet), expected)
    normal = torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(patch_nll(z, logdet), -normal.log_prob(z).sum(-1) - logdet)
    # the score drops exactly the constant (D/2) log 2 pi
    torch.testing.assert_close(patch_nll(z, logdet) - patch_scores(z, logdet), torch.full((1, 1, 2), math.log(2 * math.pi)))


def test_tail_aware_loss_per_image_by_hand():
    # two images of 2x5 = 10 patches; top 20 % -> ceil(2) = 2 patches per image
    img1 = torch.arange(10.0).reshape(2, 5)  # top2: 9, 8 -> 8.5 ; mean 4.5
    img2 = torch.full((2, 5), 1.0)
    img2[0, 0] = 11.0  # top2: 11, 1 -> 6 ; mean 2
    nll = torch.stack([img1, img2])
    # mean over all = (4.5 + 2) / 2 = 3.25 ; tail = (8.5 + 6) / 2 = 7.25
    loss = tail_aware_loss(nll, tail_weight=0.3, top_fraction=0.2, scope="per_image")
    assert loss.item() == pytest.approx(0.7 * 3.25 + 0.3 * 7.25)


def test_tail_aware_loss_batch_scope_by_hand():
    nll = torch.tensor([[[1.0, 2.0], [3.0, 10.0]], [[5.0, 6.0], [7.0, 8.0]]])  # 8 patches, mean 5.25
    # 25 % of 8 = 2 patches over the batch: 10, 8 -> 9
    loss = tail_aware_loss(nll, tail_weight=0.5, top_fraction=0.25, scope="batch")
    assert loss.item() == pytest.approx(0.5 * 5.25 + 0.5 * 9.0)
    assert tail_aware_loss(nll, 0.0, 0.25).item() == pytest.approx(5.25)
    with pytest.raises(ValueError, match="tail scope"):
        tail_aware_loss(nll, 0.5, 0.25, scope="nope")


def test_logdet_penalty():
    assert logdet_penalty(torch.tensor([[1.0, -3.0]])).item() == pytest.approx(5.0)


def test_image_score_aggregation_by_hand():
    scores = torch.tensor([[[1.0, 7.0, 3.0], [9.0, 2.0, 8.0]]])  # top3: 9, 8, 7
    assert aggregate(scores, "top_k", 3).item() == pytest.approx(8.0)
    assert aggregate(scores, "mean").item() == pytest.approx(30.0 / 6)
    assert aggregate(scores, "max").item() == pytest.approx(9.0)
    assert aggregate(scores, "top_k", 100).item() == pytest.approx(5.0)  # k capped at the patch count
    with pytest.raises(ValueError):
        aggregate(scores, "median")


def test_gaussian_blur_preserves_mass_of_constant_and_spreads_a_peak():
    const = torch.full((1, 20, 20), 3.0)
    torch.testing.assert_close(gaussian_blur(const, 2.0), const)
    peak = torch.zeros(1, 41, 41)
    peak[0, 20, 20] = 1.0
    out = gaussian_blur(peak, 2.0)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert out[0, 20, 20] < 1.0 and out.argmax().item() == 20 * 41 + 20
    # variance of the blurred peak along one axis equals sigma^2
    row = out[0].sum(0)
    x = torch.arange(41.0) - 20
    assert (row * x**2).sum().item() == pytest.approx(4.0, rel=1e-3)


def test_anomaly_maps_upsample_to_input_size():
    maps = anomaly_maps(torch.rand(2, 4, 4), (64, 48), sigma=0.0)
    assert maps.shape == (2, 64, 48)
