"""FeatureExtractor: shapes per backbone, PatchCore aggregation, preprocessing, frozen behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moleflow.config import BackboneConfig, replace
from moleflow.features.extractor import (
    FeatureExtractor,
    cnn_patches,
    image_to_tensor,
    pool_channels,
    to_grid,
    vit_patches,
)

VIT = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
LITE2 = BackboneConfig(name="efficientnet_lite2", layers=("blocks.2", "blocks.4"), embed_dim=168)
LITE0 = BackboneConfig(name="efficientnet_lite0", layers=("blocks.2", "blocks.4"), embed_dim=152)


@pytest.fixture(scope="module")
def lite2() -> FeatureExtractor:
    return FeatureExtractor(LITE2)


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return FeatureExtractor(LITE0)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(64 + 8 * i, 80, 3), dtype=np.uint8) for i in range(n)]


@pytest.mark.parametrize(("name", "d", "c"), [("lite2", 168, 168), ("lite0", 152, 152)])
def test_lite_shapes(name: str, d: int, c: int, request: pytest.FixtureRequest) -> None:
    fe: FeatureExtractor = request.getfixturevalue(name)
    assert (fe.grid, fe.embed_dim, fe.context_dim, fe.pooled_dim) == ((14, 14), d, c, 1280)
    out = fe.extract(_images(2))
    assert out.patches.shape == (2, 14, 14, d) and out.pooled.shape == (2, 1280)
    assert out.context is not None and out.context.shape == (2, 14, 14, c)
    assert all(torch.isfinite(t).all() for t in (out.patches, out.context, out.pooled))


def test_wide_resnet_shapes_random_weights() -> None:
    cfg = BackboneConfig(name="wide_resnet50_2", layers=("layer2", "layer3"), embed_dim=768, pretrained=False)
    fe = FeatureExtractor(cfg)
    assert (fe.grid, fe.embed_dim, fe.context_dim, fe.pooled_dim) == ((14, 14), 768, 1536, 2048)
    out = fe(torch.randn(1, 3, 224, 224))
    assert out.patches.shape == (1, 14, 14, 768) and out.pooled.shape == (1, 2048)
    assert out.context is not None and out.context.shape == (1, 14, 14, 1536)
    assert torch.isfinite(out.patches).all() and torch.isfinite(out.context).all()
    assert fe.backbone.mean == (0.485, 0.456, 0.406)


def test_vit_shapes_random_weights() -> None:
    cfg = BackboneConfig(name=VIT, layers=(1, 3, 5, 11), embed_dim=768, pretrained=False)
    fe = FeatureExtractor(cfg)
    assert (fe.grid, fe.embed_dim, fe.context_dim, fe.pooled_dim) == ((14, 14), 768, None, 768)
    out = fe(torch.randn(1, 3, 224, 224))
    assert out.patches.shape == (1, 14, 14, 768) and out.context is None and out.pooled.shape == (1, 768)
    assert torch.isfinite(out.patches).all() and torch.isfinite(out.pooled).all()


def test_cnn_aggregation_matches_patchcore_recipe(lite2: FeatureExtractor) -> None:
    x = lite2.preprocess(_images(2))
    with torch.no_grad():
        (l2, l3), pooled = lite2.backbone(x)
    smooth = [F.avg_pool2d(m, 3, stride=1, padding=1) for m in (l2, l3)]
    expected = torch.cat([F.avg_pool2d(smooth[0], 2), smooth[1]], dim=1).permute(0, 2, 3, 1)
    out = lite2(x)
    torch.testing.assert_close(out.patches, expected)
    raw = torch.cat([F.avg_pool2d(l2, 2), l3], dim=1).permute(0, 2, 3, 1)
    torch.testing.assert_close(out.context, raw)
    torch.testing.assert_close(out.pooled, pooled)


def test_finest_grid_upsamples_the_coarser_layer_bilinearly(lite2: FeatureExtractor) -> None:
    fine = FeatureExtractor(replace(LITE2, grid="finest"))
    assert fine.grid == (28, 28) and fine.embed_dim == 168
    x = lite2.preprocess(_images(2))
    with torch.no_grad():
        (l2, l3), _ = lite2.backbone(x)
    assert l2.shape[-2:] == (28, 28) and l3.shape[-2:] == (14, 14)
    smooth = [F.avg_pool2d(m, 3, stride=1, padding=1) for m in (l2, l3)]
    up = F.interpolate(smooth[1], size=(28, 28), mode="bilinear", align_corners=False)
    out = fine(x)
    torch.testing.assert_close(out.patches, torch.cat([smooth[0], up], dim=1).permute(0, 2, 3, 1))
    raw_up = F.interpolate(l3, size=(28, 28), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.context, torch.cat([l2, raw_up], dim=1).permute(0, 2, 3, 1))


def test_local_aggregation_kernel(lite2: FeatureExtractor) -> None:
    plain = FeatureExtractor(replace(LITE2, local_aggregation=1))
    wide = FeatureExtractor(replace(LITE2, local_aggregation=5))
    x = lite2.preprocess(_images(1))
    with torch.no_grad():
        (l2, l3), _ = lite2.backbone(x)
    torch.testing.assert_close(plain(x).patches, torch.cat([F.avg_pool2d(l2, 2), l3], dim=1).permute(0, 2, 3, 1))
    smooth = [F.avg_pool2d(m, 5, stride=1, padding=2) for m in (l2, l3)]
    torch.testing.assert_close(wide(x).patches, torch.cat([F.avg_pool2d(smooth[0], 2), smooth[1]], 1).permute(0, 2, 3, 1))


def test_to_grid_pools_down_and_interpolates_up() -> None:
    m = torch.arange(16.0).view(1, 1, 4, 4)
    assert to_grid(m, (4, 4)) is m
    assert to_grid(m, (2, 2)).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # 2x2 block means
    small = torch.tensor([[0.0, 4.0]]).view(1, 1, 1, 2)
    # bilinear, align_corners=False: output x-centres at input coordinates -0.25, 0.25, 0.75, 1.25
    assert to_grid(small, (1, 4)).flatten().tolist() == [0.0, 1.0, 3.0, 4.0]


def test_channel_pooling_averages_adjacent_channels() -> None:
    x = torch.arange(8.0).view(1, 1, 1, 8)
    assert pool_channels(x, 4).flatten().tolist() == [0.5, 2.5, 4.5, 6.5]
    assert pool_channels(x, 8) is x
    maps = [torch.full((1, 4, 2, 2), float(i)) for i in range(3)]  # three "blocks" of width 4
    out = vit_patches(maps, 6)  # 12 -> 6 channels: each block keeps 2
    assert out.shape == (1, 2, 2, 6) and out[0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]
    cnn = cnn_patches([torch.ones(1, 2, 8, 8), torch.ones(1, 4, 4, 4)], (4, 4), 3)
    assert cnn.shape == (1, 4, 4, 3)


def test_preprocess_grey_and_odd_sizes(lite2: FeatureExtractor) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    grey = rgb[:, :, 0]
    batch = lite2.preprocess([rgb, grey, grey[:, :, None]])
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == torch.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0  # (x - 0.5) / 0.5 of values in [0, 1]
    torch.testing.assert_close(batch[1], batch[2])
    torch.testing.assert_close(batch[1, 0], batch[1, 2])
    same = np.full((224, 224, 3), 255, dtype=np.uint8)
    assert torch.equal(image_to_tensor(same, 224), torch.ones(3, 224, 224))


@pytest.mark.parametrize(
    "bad",
    [np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((2, 8, 8, 3), np.uint8)],
)
def test_preprocess_rejects_bad_images(bad: np.ndarray, lite2: FeatureExtractor) -> None:
    with pytest.raises(ValueError, match="expected"):
        lite2.preprocess([bad])


@pytest.mark.parametrize("shape", [(2, 3, 200, 200), (3, 224, 224), (2, 1, 224, 224), (2, 224, 224, 3)], ids=str)
def test_forward_rejects_wrong_shapes(shape: tuple[int, ...], lite2: FeatureExtractor) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\)"):
        lite2(torch.zeros(shape))


def test_frozen(lite0: FeatureExtractor) -> None:
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    assert not any(p.requires_grad for p in lite0.parameters())
    stem = lite0.backbone.model.conv_stem  # its BatchNorm is folded into it (moleflow.features.folding)
    before = stem.weight.clone()
    out = lite0(torch.randn(2, 3, 224, 224) * 3)
    assert torch.equal(stem.weight, before)
    assert not out.patches.requires_grad
    weight = torch.nn.Parameter(torch.ones(lite0.embed_dim))
    (out.patches * weight).sum().backward()  # ordinary tensors, usable by trainable modules
    assert weight.grad is not None


def test_embed_dim_wider_than_layers_is_rejected() -> None:
    cfg = BackboneConfig(name="efficientnet_lite0", layers=("blocks.2", "blocks.4"), embed_dim=200, pretrained=False)
    with pytest.raises(ValueError, match=r"embed_dim must lie in \[1, 152\]"):
        FeatureExtractor(cfg)


def test_pretrained_features_differ_from_random(lite0: FeatureExtractor) -> None:
    random = FeatureExtractor(replace(LITE0, pretrained=False))
    x = lite0.preprocess(_images(1))
    assert not torch.allclose(lite0(x).patches, random(x).patches, atol=1e-2)


def test_channels_last_is_the_cnn_default_and_equals_nchw(lite0: FeatureExtractor) -> None:
    images = _images(2)
    assert lite0.memory_format == torch.channels_last
    fast = lite0.extract(images)
    try:
        lite0.set_memory_format(torch.contiguous_format)
        reference = lite0.extract(images)
    finally:
        lite0.set_memory_format(torch.channels_last)
    for name in ("patches", "context", "pooled"):
        torch.testing.assert_close(getattr(fast, name), getattr(reference, name), rtol=1e-4, atol=1e-4)
