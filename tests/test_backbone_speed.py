"""The faster backbone path computes the same features: BatchNorm folding, CPU micro-batches, stopping
after the deepest selected layer, and anomaly maps as one matrix per axis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from moleflow.config import BackboneConfig, preset
from moleflow.features import extractor as extractor_module
from moleflow.features.backbones import create_backbone
from moleflow.features.extractor import FeatureExtractor, cnn_patches, extractor_for
from moleflow.features.folding import fold_batchnorm
from moleflow.features.store import FeatureSource
from moleflow.scoring import anomaly_maps, gaussian_blur

LITE0 = BackboneConfig(name="efficientnet_lite0", layers=("blocks.2", "blocks.4"), embed_dim=152)


def _batchnorms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return FeatureExtractor(LITE0)


def _inputs(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 0.6


def test_folded_backbone_gives_the_unfolded_features(lite0: FeatureExtractor) -> None:
    reference = create_backbone(LITE0.name, LITE0.layers, 224, pretrained=True)
    assert lite0.folded_norms == _batchnorms(reference) > 40 and _batchnorms(lite0) == 0
    x = _inputs(3)
    with torch.inference_mode():
        maps, pooled = reference(x)
        patches = cnn_patches(maps, lite0.grid, lite0.embed_dim, LITE0.local_aggregation)
    out = lite0(x)
    for ours, ref in ((out.patches, patches), (out.pooled, pooled)):
        assert ours.shape == ref.shape
        assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-5  # float32 rounding of the folded weights
    wrong = lite0.backbone.model.conv_stem.weight.clone()
    wrong.mul_(1.01)
    assert not torch.allclose(lite0.backbone.model.conv_stem.weight, wrong)


def test_fold_refuses_training_mode_and_leaves_unknown_architectures_alone() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model.train())
    resnet = timm.create_model("resnet18", pretrained=False).eval()
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    assert fold_batchnorm(resnet) == 0
    after = resnet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_cpu_micro_batches_equal_one_call(lite0: FeatureExtractor, monkeypatch: pytest.MonkeyPatch) -> None:
    x = _inputs(2 * extractor_module.CPU_BACKBONE_CHUNK + 1)  # two full chunks and a remainder
    chunked = lite0(x)
    monkeypatch.setattr(extractor_module, "CPU_BACKBONE_CHUNK", x.shape[0])
    whole = lite0(x)
    for a, b in ((chunked.patches, whole.patches), (chunked.pooled, whole.pooled), (chunked.context, whole.context)):
        assert a is not None and b is not None and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # a convolution may pick another kernel per batch size
    assert not chunked.patches.is_inference()  # usable by trainable modules, as before


def test_without_pooled_the_patches_are_the_same_bits(lite0: FeatureExtractor) -> None:
    lean = FeatureExtractor(LITE0, pooled=False)
    x = _inputs(2)
    full, short = lite0(x), lean(x)
    assert torch.equal(full.patches, short.patches) and torch.equal(full.context, short.context)
    assert short.pooled.shape == (2, 0) and lean.pooled_dim == 0 and lite0.pooled_dim == full.pooled.shape[1] > 0


def test_extractor_for_keeps_the_image_feature_only_for_the_pooled_router() -> None:
    offline, paper = preset("offline"), preset("offline")
    paper.router.feature = "backbone_pooled"
    paper.model.backbone = offline.model.backbone = LITE0
    assert not extractor_for(offline).with_pooled and extractor_for(paper).with_pooled


@dataclass
class _ArraySample:
    name: str
    image: np.ndarray

    def load_image(self, max_side: int | None = None) -> np.ndarray:
        return self.image


def test_a_cache_without_the_image_feature_is_kept_apart(lite0: FeatureExtractor, tmp_path: Path) -> None:
    """A pooled-less cache file must never serve an extractor (a router) that needs the pooled feature."""
    rng = np.random.default_rng(0)
    samples = [_ArraySample(f"s{i}", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in range(2)]
    lean = FeatureSource(FeatureExtractor(LITE0, pooled=False), need_context=False, cache_dir=tmp_path, progress=False)
    full = FeatureSource(lite0, need_context=False, cache_dir=tmp_path, progress=False)
    assert lean(samples).pooled.shape == (2, 0)
    assert full(samples).pooled.shape == (2, lite0.pooled_dim)  # not read from the lean file
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert lean(samples).pooled.shape == (2, 0) and full(samples).pooled.shape == (2, lite0.pooled_dim)  # both reused


@pytest.mark.parametrize("sigma", [0.0, 2.0, 4.0])
@pytest.mark.parametrize(("grid", "size"), [((14, 14), (224, 224)), ((4, 6), (64, 48)), ((28, 11), (37, 300))])
def test_anomaly_maps_equal_upsampling_then_blur(sigma: float, grid: tuple[int, int], size: tuple[int, int]) -> None:
    scores = torch.randn(3, *grid, generator=torch.Generator().manual_seed(1)) * 5 + 20
    up = F.interpolate(scores[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    reference = gaussian_blur(up, sigma)
    maps = anomaly_maps(scores, size, sigma)
    assert maps.shape == reference.shape and maps.dtype == scores.dtype
    assert float((maps - reference).abs().max()) < 1e-5 * float(reference.abs().max())
