"""The experiment's on-disk feature cache: the backbone runs once per set of images."""

import pytest
import torch

from moleflow import experiment as E
from moleflow.config import preset
from moleflow.data.synthetic import make_synthetic_task


def test_feature_cache_is_reused_and_keyed_by_the_images(tmp_path, monkeypatch):
    cfg = preset("offline")
    task = make_synthetic_task("stripes", n_train=3, n_test=2, seed=0)
    other = make_synthetic_task("stripes", n_train=3, n_test=2, seed=1)
    cache = tmp_path / "cache"
    first = E.ContinualExperiment(cfg, tmp_path / "a", progress=False, feature_cache=cache)
    feats = first.extract(task.train, "train")
    assert len(list(cache.glob("*.safetensors"))) == 1

    real = E.extract_features
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "extract_features", counting)
    second = E.ContinualExperiment(cfg, tmp_path / "b", progress=False, feature_cache=cache)
    again = second.extract(task.train, "train")
    assert calls == []  # loaded, not extracted
    assert torch.equal(again.patches, feats.patches) and torch.equal(again.pooled, feats.pooled)
    fresh = second.extract(other.train, "train")  # other pixels -> another key -> extracted
    assert calls == [1] and not torch.equal(fresh.patches, feats.patches)
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_features_with_and_without_context_are_cached_side_by_side(tmp_path, monkeypatch):
    """The scale context needs the multi-layer maps: its cache entry must not evict the plain one."""
    from moleflow.config import apply_overrides

    task = make_synthetic_task("disc", n_train=2, n_test=2, seed=0)
    plain = preset("offline")
    with_context = apply_overrides(preset("offline"), ["model.scale_context.kernel_size=3"])
    cache = tmp_path / "cache"
    for cfg in (plain, with_context):
        E.ContinualExperiment(cfg, tmp_path / "run", progress=False, feature_cache=cache).extract(task.train, "t")
    assert len(list(cache.glob("*.safetensors"))) == 2

    monkeypatch.setattr(E, "extract_features", lambda *a, **k: pytest.fail("extracted again"))
    for cfg in (plain, with_context):
        feats = E.ContinualExperiment(cfg, tmp_path / "run", progress=False, feature_cache=cache).extract(task.train, "t")
        assert (feats.context is not None) == (cfg is with_context)
