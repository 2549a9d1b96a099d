"""Frozen backbones, patch-feature extraction and the per-task feature cache."""

from moleflow.features.backbones import (
    Backbone,
    BackboneUnavailableError,
    BackboneWeightsError,
    create_backbone,
    list_backbones,
    register_backbone,
)
from moleflow.features.cache import (
    CachedFeatures,
    CacheMismatchError,
    ImageLoadError,
    cache_fingerprint,
    extract_features,
)
from moleflow.features.extractor import BackboneFeatures, FeatureExtractor, image_to_tensor

__all__ = [
    "Backbone",
    "BackboneFeatures",
    "BackboneUnavailableError",
    "BackboneWeightsError",
    "CacheMismatchError",
    "CachedFeatures",
    "FeatureExtractor",
    "ImageLoadError",
    "cache_fingerprint",
    "create_backbone",
    "extract_features",
    "image_to_tensor",
    "list_backbones",
    "register_backbone",
]
