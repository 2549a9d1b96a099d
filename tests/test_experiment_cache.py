"""The on-disk feature cache of a detector: the backbone runs once per set of images."""

import pytest
import torch

from moleflow.config import apply_overrides, preset
from moleflow.data.synthetic import make_synthetic_task
from moleflow.detector import Detector
from moleflow.features import store


def _detector(cfg, cache):
    return Detector.create(cfg, progress=False, feature_cache=cache)


def test_feature_cache_is_reused_and_keyed_by_the_images(tmp_path, monkeypatch):
    cfg = preset("offline")
    task = make_synthetic_task("stripes", n_train=3, n_test=2, seed=0)
    other = make_synthetic_task("stripes", n_train=3, n_test=2, seed=1)
    cache = tmp_path / "cache"
    feats = _detector(cfg, cache).features(task.train, "train")
    assert len(list(cache.glob("*.safetensors"))) == 1

    real = store.extract_features
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "extract_features", counting)
    second = _detector(cfg, cache)
    again = second.features(task.train, "train")
    assert calls == []  # loaded, not extracted
    assert torch.equal(again.patches, feats.patches) and torch.equal(again.pooled, feats.pooled)
    fresh = second.features(other.train, "train")  # other pixels -> another key -> extracted
    assert calls == [1] and not torch.equal(fresh.patches, feats.patches)
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_a_truncated_cache_file_is_rebuilt_with_a_warning_naming_it(tmp_path, caplog):
    cfg = preset("offline")
    task = make_synthetic_task("disc", n_train=2, n_test=2, seed=0)
    cache = tmp_path / "cache"
    feats = _detector(cfg, cache).features(task.train, "t")
    (path,) = cache.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    again = _detector(cfg, cache).features(task.train, "t")
    assert torch.equal(again.patches, feats.patches)
    assert str(path) in caplog.text and "unreadable" in caplog.text


def test_features_with_and_without_context_are_cached_side_by_side(tmp_path, monkeypatch):
    """The scale context needs the multi-layer maps: its cache entry must not evict the plain one."""
    task = make_synthetic_task("disc", n_train=2, n_test=2, seed=0)
    plain = preset("offline")
    with_context = apply_overrides(preset("offline"), ["model.scale_context.kernel_size=3"])
    cache = tmp_path / "cache"
    for cfg in (plain, with_context):
        _detector(cfg, cache).features(task.train, "t")
    assert len(list(cache.glob("*.safetensors"))) == 2

    monkeypatch.setattr(store, "extract_features", lambda *a, **k: pytest.fail("extracted again"))
    for cfg in (plain, with_context):
        feats = _detector(cfg, cache).features(task.train, "t")
        assert (feats.context is not None) == (cfg is with_context)
