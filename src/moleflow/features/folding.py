"""Fold a frozen CNN's BatchNorm layers into the convolutions before them (inference only).

A BatchNorm in eval mode is a per-channel affine map ``y = g (x - m) / sqrt(v + eps) + b``; after a
convolution it can be merged into the convolution's weight and bias (``torch.nn.utils.fusion``), which
saves a full pass over every activation map. On 2 CPU cores that makes the EfficientNet-Lite backbones
about 1.4x faster (docs/PERFORMANCE.md, "Backbone path"); outputs change by float32 rounding only
(about 2e-6 of their scale, tests/test_backbone_speed.py).

Which convolution feeds which norm is taken from timm's block definitions (attribute names), not
guessed from module order: a model with a block type not listed here is left unfolded as a whole.
"""

from __future__ import annotations

import logging

import torch
from timm.layers.norm_act import BatchNormAct2d
from timm.models import _efficientnet_blocks as blocks
from timm.models.efficientnet import EfficientNet
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

log = logging.getLogger(__name__)

#: (conv attribute, norm attribute) pairs of each timm module type whose norms can be folded.
FOLDABLE: dict[type, tuple[tuple[str, str], ...]] = {
    EfficientNet: (("conv_stem", "bn1"), ("conv_head", "bn2")),
    blocks.DepthwiseSeparableConv: (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    blocks.InvertedResidual: (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    blocks.EdgeResidual: (("conv_exp", "bn1"), ("conv_pwl", "bn2")),
}


class NormActivation(nn.Module):
    """What is left of a ``BatchNormAct2d`` once its affine part lives in the convolution: drop + act."""

    def __init__(self, norm: BatchNormAct2d) -> None:
        super().__init__()
        self.drop = norm.drop
        self.act = norm.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _foldable(model: nn.Module) -> bool:
    """Whether every BatchNorm of ``model`` sits in a known (conv, norm) pair."""
    known = {id(getattr(owner, norm)) for owner in model.modules() for _, norm in FOLDABLE.get(type(owner), ())}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return bool(norms) and all(id(n) in known and type(n) is BatchNormAct2d for n in norms)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every BatchNorm of a frozen timm EfficientNet into its convolution.

    Returns the number of norms folded: 0 (model untouched) unless every norm of ``model`` belongs to
    a known pair. Only for inference: the folded model has no norm statistics left to train.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (BatchNorm running statistics)")
    if not _foldable(model):
        log.debug("%s: BatchNorm left unfolded (a block type without a known conv/norm pairing)", type(model).__name__)
        return 0
    folded = 0
    for owner in list(model.modules()):
        for conv_name, norm_name in FOLDABLE.get(type(owner), ()):
            conv, norm = getattr(owner, conv_name), getattr(owner, norm_name)
            assert isinstance(conv, nn.Conv2d) and isinstance(norm, BatchNormAct2d)
            assert norm.running_mean is not None and norm.running_var is not None
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
            )
            conv.weight, conv.bias = weight.requires_grad_(False), bias.requires_grad_(False)
            setattr(owner, norm_name, NormActivation(norm))
            folded += 1
    return folded
