"""Feature cache: extraction equals the extractor, batching, safetensors round trip, fingerprints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moleflow.config import BackboneConfig
from moleflow.features.cache import (
    CachedFeatures,
    CacheMismatchError,
    ImageLoadError,
    cache_fingerprint,
    extract_features,
)
from moleflow.features.extractor import FeatureExtractor

LITE0 = BackboneConfig(name="efficientnet_lite0", layers=("blocks.2", "blocks.4"), embed_dim=152)


@dataclass(frozen=True)
class FakeSample:
    """The duck type of moleflow.data.base.Sample that the cache relies on."""

    path: str
    seed: int

    def load_image(self, max_side: int | None = None) -> np.ndarray:
        if self.seed < 0:
            raise OSError("truncated file")
        rng = np.random.default_rng(self.seed)
        return rng.integers(0, 256, size=(48 + self.seed, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(LITE0)


@pytest.fixture(scope="module")
def samples() -> list[FakeSample]:
    return [FakeSample(f"img_{i}.png", i) for i in range(5)]


@pytest.fixture(scope="module")
def cached(extractor: FeatureExtractor, samples: list[FakeSample]) -> CachedFeatures:
    return extract_features(extractor, samples, batch_size=2, need_context=True, progress=False)


def test_extraction_equals_direct_extractor(
    cached: CachedFeatures, extractor: FeatureExtractor, samples: list[FakeSample]
) -> None:
    direct = extractor.extract([s.load_image() for s in samples])
    assert len(cached) == 5 and cached.patches.shape == (5, 14, 14, 152) and cached.patches.device.type == "cpu"
    torch.testing.assert_close(cached.patches, direct.patches)
    torch.testing.assert_close(cached.context, direct.context)
    torch.testing.assert_close(cached.pooled, direct.pooled)
    assert cached.fingerprint == cache_fingerprint(LITE0)


def test_without_context_in_float16(extractor: FeatureExtractor, samples: list[FakeSample]) -> None:
    half = extract_features(extractor, samples[:3], batch_size=4, need_context=False, progress=False, dtype=torch.float16)
    assert half.context is None and half.patches.dtype == torch.float16 and half.pooled.dtype == torch.float32
    assert half.to().patches.dtype == torch.float32


def test_context_needs_a_cnn(samples: list[FakeSample]) -> None:
    vit_like = SimpleNamespace(context_dim=None, config=BackboneConfig(name="vit"))
    with pytest.raises(ValueError, match="no multi-layer context"):
        extract_features(vit_like, samples, need_context=True, progress=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_image_load_errors_name_the_file(extractor: FeatureExtractor, num_workers: int) -> None:
    broken = [FakeSample("good.png", 1), FakeSample("/data/broken_007.png", -1)]
    with pytest.raises(ImageLoadError, match=r"broken_007\.png.*truncated file"):
        extract_features(extractor, broken, need_context=False, progress=False, num_workers=num_workers)


def test_indexing_and_batches(cached: CachedFeatures) -> None:
    assert len(cached[1]) == 1 and torch.equal(cached[-1].patches[0], cached.patches[4])
    assert torch.equal(cached[1:3].pooled, cached.pooled[1:3])
    assert torch.equal(cached[[4, 0]].context, cached.context[[4, 0]])
    assert torch.equal(cached[np.int64(2)].pooled, cached[2].pooled) and len(cached[torch.tensor(0)]) == 1
    mask = torch.tensor([True, False, True, False, False])
    assert torch.equal(cached[mask].patches, cached.patches[[0, 2]])
    with pytest.raises(IndexError):
        cached[5]
    ordered = list(cached.batches(2))
    assert [len(b) for b in ordered] == [2, 2, 1]
    assert torch.equal(torch.cat([b.patches for b in ordered]), cached.patches)
    assert [len(b) for b in cached.batches(2, drop_last=True)] == [2, 2]
    runs = [
        [b.pooled for b in cached.batches(2, shuffle=True, generator=torch.Generator().manual_seed(3))] for _ in range(2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))  # reproducible
    shuffled = torch.cat(runs[0])
    assert not torch.equal(shuffled, cached.pooled)
    assert torch.equal(shuffled.sort(dim=0).values, cached.pooled.sort(dim=0).values)  # a permutation


def test_save_load_round_trip(cached: CachedFeatures, tmp_path: Path) -> None:
    path = cached.save(tmp_path / "sub" / "task0.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["task0.safetensors"]  # no temp file left over
    loaded = CachedFeatures.load(path, expected=cache_fingerprint(LITE0))
    for field in ("patches", "context", "pooled"):
        assert torch.equal(getattr(loaded, field), getattr(cached, field)), field
    assert loaded.fingerprint == cached.fingerprint
    no_context = dataclasses.replace(cached, context=None, patches=cached.patches.half())
    again = CachedFeatures.load(no_context.save(path))  # overwrite in place
    assert again.context is None and again.patches.dtype == torch.float16


def test_fingerprint_mismatch_rejected(cached: CachedFeatures, tmp_path: Path) -> None:
    path = cached.save(tmp_path / "task0.safetensors")
    other = BackboneConfig(name="efficientnet_lite0", layers=("blocks.1", "blocks.4"), embed_dim=136)
    with pytest.raises(CacheMismatchError, match="embed_dim: cached 152 vs wanted 136"):
        CachedFeatures.load(path, expected=cache_fingerprint(other))
    with pytest.raises(CacheMismatchError, match="samples"):
        CachedFeatures.load(path, expected=cache_fingerprint(LITE0, samples="abc123"))


def test_foreign_safetensors_rejected(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"patches": torch.zeros(1, 2, 2, 4)}, str(path))
    with pytest.raises(CacheMismatchError, match="not a moleflow feature cache"):
        CachedFeatures.load(path)


def test_inconsistent_shapes_rejected() -> None:
    with pytest.raises(ValueError, match="pooled"):
        CachedFeatures(torch.zeros(2, 3, 3, 4), None, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="context"):
        CachedFeatures(torch.zeros(2, 3, 3, 4), torch.zeros(2, 4, 4, 6), torch.zeros(2, 5))
