"""Behaviour that earlier test suites let slip: each test here fails on a specific plausible bug."""

from __future__ import annotations

import math

import pytest
import torch

from moleflow.config import DIAConfig, RouterConfig, ScoringConfig
from moleflow.features.cache import CachedFeatures
from moleflow.flow.dia import DIACoupling
from moleflow.inference import score_features
from moleflow.losses import tail_aware_loss
from moleflow.routing import Router
from moleflow.scoring import patch_scores
from tests.helpers import build_perturbed_model, task_features


def test_a_routed_mixed_batch_scores_every_group_with_its_own_tasks_adapters():
    """Bug this catches: scoring every routed group with task 0's adapters (the shapes all agree)."""
    model = build_perturbed_model("offline", tasks=("t0", "t1"), dim=8).float()
    router = Router(RouterConfig())
    near0, near1 = task_features(0.0, n=4, seed=1, dim=8), task_features(6.0, n=4, seed=2, dim=8)
    for name, feats in (("t0", near0), ("t1", near1)):
        router.add(name, feats.patches.mean(dim=(0, 1, 2)).double(), torch.eye(8, dtype=torch.float64))
    mixed = CachedFeatures(
        torch.cat([near0.patches[:2], near1.patches[:2]]), None, torch.cat([near0.pooled[:2], near1.pooled[:2]])
    )

    scored = score_features(model, router, mixed, ScoringConfig())
    assert scored.task_index.tolist() == [0, 0, 1, 1]
    with torch.no_grad():
        for i, t in enumerate(scored.task_index.tolist()):
            out = model(mixed.patches[i : i + 1], router.tasks[t])
            torch.testing.assert_close(scored.patch_scores[i : i + 1], patch_scores(out.z, out.logdet))
        wrong = model(mixed.patches[2:], "t0")  # what the bug would compute for t1's images
        assert not torch.allclose(scored.patch_scores[2:], patch_scores(wrong.z, wrong.logdet))


def test_dia_scale_is_the_soft_clamp_of_the_outline():
    """Bug this catches: a hard clamp (or none) in place of ``clamp * tanh(s / clamp)``."""
    coupling = DIACoupling(dim=4, hidden=3, clamp=1.9, passive_first=True).double()
    raw = torch.tensor([1.5, -4.0], dtype=torch.float64)  # inside and beyond the clamp
    with torch.no_grad():
        coupling.out_layer.weight.zero_()
        coupling.out_layer.bias.copy_(torch.tensor([*raw, 0.0, 0.0]))
    x = torch.randn(1, 1, 1, 4, dtype=torch.float64)
    y, logdet = coupling(x)
    s = 1.9 * torch.tanh(raw / 1.9)
    assert logdet.item() == pytest.approx(float(s.sum()), abs=1e-12)
    torch.testing.assert_close(y[..., 2:], x[..., 2:] * torch.exp(s))
    assert logdet.item() != pytest.approx(float(raw.clamp(-1.9, 1.9).sum()), abs=1e-3)  # a hard clamp differs


def test_the_per_image_tail_takes_the_ceiling_of_its_share():
    """Bug this catches: flooring the per-image tail count (10 patches x 15 % = 1.5 -> 2, not 1)."""
    nll = torch.arange(10.0).reshape(1, 2, 5)  # one image; top 2: 9, 8 -> 8.5; top 1: 9
    loss = tail_aware_loss(nll, tail_weight=1.0, top_fraction=0.15, scope="per_image")
    assert loss.item() == pytest.approx(8.5)
    assert math.ceil(0.15 * 10) == 2


def test_dia_config_clamp_reaches_the_couplings():
    from moleflow.flow.dia import DeepInvertibleAdapter

    adapter = DeepInvertibleAdapter(8, DIAConfig(blocks=2, clamp=0.7))
    assert [b.clamp for b in adapter.blocks] == [0.7, 0.7]
