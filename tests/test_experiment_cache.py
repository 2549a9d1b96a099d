"""The experiment's on-disk feature cache: the backbone runs once per set of images."""

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
