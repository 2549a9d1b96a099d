"""PatchCore baseline: coreset selection, nearest-neighbour scoring, image scores."""

from __future__ import annotations

import math

import pytest
import torch

from moleflow.baselines import PatchCoreScorer, greedy_coreset, nearest_neighbours


def _features(n: int, seed: int, h: int = 4, w: int = 4, d: int = 16) -> torch.Tensor:
    return torch.randn(n, h, w, d, generator=torch.Generator().manual_seed(seed))


def test_far_patches_score_higher() -> None:
    train = _features(8, seed=0)
    test = _features(3, seed=1)
    test[1, 2, 3] += 8.0  # one far-off patch in image 1
    test[2, :2, :2] -= 8.0  # a 2x2 far-off blob in image 2
    scorer = PatchCoreScorer(coreset_ratio=0.25, seed=0).fit(train)
    scores = scorer.score(test)
    assert scores.shape == (3, 4, 4)
    far = torch.zeros(3, 4, 4, dtype=torch.bool)
    far[1, 2, 3] = True
    far[2, :2, :2] = True
    assert scores[far].min() > scores[~far].max()
    image = scorer.image_scores(test)
    assert image.shape == (3,)
    assert image[0] < image[1] and image[0] < image[2]
    torch.testing.assert_close(image, scores.amax(dim=(1, 2)))


def test_coreset_count_and_determinism() -> None:
    patches = _features(4, seed=2, d=32).reshape(-1, 32)  # 64 patches
    a = greedy_coreset(patches, 10, projection_dim=8, seed=3)
    b = greedy_coreset(patches, 10, projection_dim=8, seed=3)
    assert a.shape == (10,) and len(set(a.tolist())) == 10
    assert torch.equal(a, b)
    scorer = PatchCoreScorer(coreset_ratio=0.1, projection_dim=8, seed=3).fit(patches.reshape(4, 4, 4, 32))
    assert scorer.memory_bank is not None and scorer.memory_bank.shape == (round(0.1 * 64), 32)


def test_coreset_is_greedy_k_center() -> None:
    # Without projection every step must pick the patch farthest from the current selection.
    patches = _features(2, seed=4, d=5).reshape(-1, 5)
    selected = greedy_coreset(patches, 8, projection_dim=None, seed=0).tolist()
    for k in range(1, len(selected)):
        to_set = torch.cdist(patches, patches[selected[:k]]).min(dim=1).values
        assert to_set[selected[k]] == pytest.approx(float(to_set.max()), abs=1e-5)


def test_coreset_with_duplicates_stays_distinct() -> None:
    patches = torch.ones(20, 3)
    selected = greedy_coreset(patches, 20, projection_dim=None)
    assert sorted(selected.tolist()) == list(range(20))


def test_nearest_neighbours_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(5)
    queries, bank = torch.randn(37, 6, generator=gen), torch.randn(11, 6, generator=gen)
    dist, idx = nearest_neighbours(queries, bank, chunk_elements=50)  # 4 query rows per chunk
    for q in range(37):
        brute = [math.dist(queries[q].tolist(), bank[m].tolist()) for m in range(11)]
        assert dist[q].item() == pytest.approx(min(brute), abs=1e-4)
        assert idx[q].item() == brute.index(min(brute))


def test_full_ratio_keeps_every_patch() -> None:
    train = _features(2, seed=6)
    scorer = PatchCoreScorer(coreset_ratio=1.0).fit(train)
    assert scorer.memory_bank is not None
    torch.testing.assert_close(scorer.memory_bank, train.reshape(-1, 16))
    assert scorer.score(train).abs().max() == 0.0  # every training patch is in the bank


def test_reweighting_follows_eq7() -> None:
    train, test = _features(4, seed=7), _features(2, seed=8)
    plain = PatchCoreScorer(coreset_ratio=0.5).fit(train)
    weighted = PatchCoreScorer(coreset_ratio=0.5, reweight_neighbours=3).fit(train)
    bank = weighted.memory_bank
    assert bank is not None
    s = plain.score(test).reshape(2, -1)
    expected = []
    for i in range(2):
        p = int(s[i].argmax())
        m_test = test[i].reshape(-1, 16)[p]
        m_star = bank[torch.cdist(m_test[None], bank).argmin()]
        support = bank[torch.cdist(m_star[None], bank)[0].argsort()[:3]]
        d = torch.linalg.vector_norm(support - m_test, dim=1)
        expected.append((1 - torch.exp(s[i, p]) / torch.exp(d).sum()) * s[i, p])
    torch.testing.assert_close(weighted.image_scores(test), torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_errors() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        PatchCoreScorer().score(_features(1, seed=0))
    scorer = PatchCoreScorer().fit(_features(1, seed=0))
    with pytest.raises(ValueError, match="features"):
        scorer.score(_features(1, seed=0, d=8))
    with pytest.raises(ValueError, match=r"\(N, H, W, D\)"):
        scorer.score(torch.zeros(4, 16))
    with pytest.raises(ValueError, match="NaN"):
        scorer.score(torch.full((1, 2, 2, 16), float("nan")))
    with pytest.raises(ValueError, match="coreset_ratio"):
        PatchCoreScorer(coreset_ratio=0.0)
    with pytest.raises(ValueError, match="coreset size"):
        greedy_coreset(torch.zeros(3, 2), 4)


def _plain_greedy(x: torch.Tensor, num: int, start: int) -> list[int]:
    """Algorithm 1 without pruning: every patch's distance to every new centre."""
    min_dist = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    selected = [start]
    for _ in range(num - 1):
        min_dist = torch.minimum(min_dist, ((x - x[selected[-1]]) ** 2).sum(dim=1))
        min_dist[selected] = -1.0
        selected.append(int(min_dist.argmax()))
    return selected


def test_pruned_coreset_equals_plain_greedy() -> None:
    # clustered patches (the case pruning is for): the pruned selection must be Algorithm 1's, step by step
    gen = torch.Generator().manual_seed(9)
    centres = 4.0 * torch.randn(12, 6, generator=gen, dtype=torch.float64)
    x = (centres.repeat_interleave(50, dim=0) + torch.randn(600, 6, generator=gen, dtype=torch.float64)).float()
    selected = greedy_coreset(x, 120, projection_dim=None, seed=1)
    assert selected.tolist() == _plain_greedy(x.double(), 120, int(selected[0]))


def test_patchcore_backbone_is_the_finest_grid_with_3x3_averaging() -> None:
    from moleflow.baselines import patchcore_backbone
    from moleflow.config import preset, replace
    from moleflow.features.extractor import FeatureExtractor

    mole = replace(preset("offline").model.backbone, image_size=256, local_aggregation=1)
    faithful = patchcore_backbone(mole)
    assert (faithful.name, faithful.image_size, faithful.layers, faithful.embed_dim) == (
        mole.name,
        256,
        mole.layers,
        mole.embed_dim,
    )
    assert (faithful.grid, faithful.local_aggregation) == ("finest", 3)
    assert FeatureExtractor(replace(faithful, pretrained=False)).grid == (32, 32)  # stride 8 at 256 px
    assert PatchCoreScorer().coreset_ratio == 0.1
