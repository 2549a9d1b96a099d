"""What is traced to ONNX: the backbone's feature extractor, one head per product, and the router graph.

- :class:`BackboneGraph`: normalised images ``(B, 3, S, S)`` -> ``patches (B, h, w, D)``, ``routing (B, G)``
  (the router's input, :func:`moleflow.training.routing_features`) and, for a model with a scale context,
  ``context (B, h, w, C)``. It computes what :meth:`FeatureExtractor.forward` computes, with the adaptive
  average poolings (which the ONNX exporter cannot express) written as the equal fixed averaging
  matrices: the configured image size fixes every layer's map size.
- :class:`HeadGraph`: ``patches`` (and ``context``) -> patch scores ``(B, h, w)`` of one product: its
  whitening, the mixer, the flow with its LoRA merged into the base weights (:func:`merged_model` puts
  ``LoRALinear.merged_weight`` in place, so each subnet linear is one matmul in the graph), its DIA, and
  ``0.5 |z|^2 - log|det J|``. Thresholds are not in any graph: they stay in the manifest.
- :func:`router_graph`: squared Mahalanobis distances of routing features to prototypes that are the
  graph's *inputs* (float64), so adding a product adds data, not a graph.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from copy import deepcopy as copy_module
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moleflow.atomic import atomic_write
from moleflow.features.extractor import FeatureExtractor
from moleflow.flow.lora import LoRALinear
from moleflow.flow.model import MoLEFlow
from moleflow.scoring import patch_scores
from moleflow.training import patch_moments

__all__ = [
    "OPSET",
    "BackboneGraph",
    "HeadGraph",
    "MergedLinear",
    "average_matrix",
    "export_module",
    "merged_model",
    "router_graph",
]

OPSET = 17  # LayerNormalization is an ONNX op from 17 on


def average_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)``: adaptive average pooling of a length-``n_in`` axis to ``n_out`` bins (torch's
    bins: ``[floor(i n_in / n_out), ceil((i + 1) n_in / n_out))``)."""
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class BackboneGraph(nn.Module):
    """See the module docstring; ``forward(images) -> (patches, routing[, context])``."""

    def __init__(self, extractor: FeatureExtractor, model: MoLEFlow, routing_feature: str) -> None:
        super().__init__()
        self.backbone = extractor.backbone
        self.kind = extractor.backbone.kind
        self.routing_feature = routing_feature
        self.with_context = model.scale_context is not None
        s, (h, w) = extractor.image_size, extractor.grid
        with torch.inference_mode():
            maps, _ = self.backbone(torch.zeros(1, 3, s, s), pooled=False)
        self.rows = [average_matrix(m.shape[-2], h) for m in maps]  # (h, H_l) per layer
        self.cols = [average_matrix(m.shape[-1], w).T.contiguous() for m in maps]  # (W_l, w)
        width = sum(m.shape[1] for m in maps)
        self.channels = average_matrix(width, extractor.embed_dim).T.contiguous()  # (C, D)
        self.pool_channels = width != extractor.embed_dim
        pe = model.positional(h, w, torch.zeros(()))
        self.register_buffer("pe", pe if model.cfg.positional_encoding else torch.zeros_like(pe))

    def _grid(self, maps: Sequence[torch.Tensor], smooth: bool) -> torch.Tensor:
        """Layer maps ``[(B, C_l, H_l, W_l)]`` pooled to the grid and concatenated: ``(B, h, w, sum C_l)``."""
        parts = []
        for m, rows, cols in zip(maps, self.rows, self.cols, strict=True):
            if smooth:
                m = F.avg_pool2d(m, 3, stride=1, padding=1)
            parts.append(rows @ m @ cols)
        return torch.cat(parts, dim=1).permute(0, 2, 3, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps, pooled = self.backbone(images, pooled=self.routing_feature == "backbone_pooled")
        if self.kind == "cnn":
            patches = self._grid(maps, smooth=True)
        else:
            patches = torch.cat(list(maps), dim=1).permute(0, 2, 3, 1)
        if self.pool_channels:
            patches = patches @ self.channels
        if self.routing_feature == "backbone_pooled":
            routing = pooled
        elif self.routing_feature == "patch_moments":
            routing = patch_moments(patches)
        else:
            routing = (patches + self.pe).mean(dim=(1, 2))
        if self.with_context:
            return patches, routing, self._grid(maps, smooth=False)
        return patches, routing


class MergedLinear(nn.Module):
    """One product's LoRA linear folded into a plain one: ``W_t = W + scale B_t A_t``, ``b_t = b + task bias``."""

    def __init__(self, layer: LoRALinear, product: str) -> None:
        super().__init__()
        with torch.no_grad():
            self.weight = nn.Parameter(layer.merged_weight(product).detach().clone(), requires_grad=False)
            self.bias = nn.Parameter(layer.effective_bias(product).detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, task: str | None) -> torch.Tensor:
        """``x (..., in) -> (..., out)``; ``task`` is the product this layer was merged for."""
        return F.linear(x, self.weight, self.bias)


def merged_model(model: MoLEFlow, product: str) -> MoLEFlow:
    """A copy of ``model`` whose every LoRA linear is ``product``'s merged linear (one matmul in the graph)."""
    copy = copy_module(model).eval()
    for module in list(copy.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, MergedLinear(child, product))
    return copy


class HeadGraph(nn.Module):
    """See the module docstring; ``forward(patches[, context]) -> patch scores (B, h, w)``."""

    def __init__(self, model: MoLEFlow, product: str) -> None:
        super().__init__()
        self.model, self.product = merged_model(model, product), product

    def forward(self, patches: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(patches, self.product, context)
        return patch_scores(out.z, out.logdet)


def export_module(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: str | os.PathLike[str],
    inputs: Sequence[str],
    outputs: Sequence[str],
) -> Path:
    """Trace ``module`` on ``example`` to ONNX at ``path`` (atomically), the first axis of every input and
    output dynamic (``batch``); checked with ``onnx.checker`` before it is moved into place."""
    import onnx

    axes = {name: {0: "batch"} for name in (*inputs, *outputs)}

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python values in timm's padding code
            torch.onnx.export(
                module.eval(),
                example,
                tmp,
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
        onnx.checker.check_model(tmp, full_check=True)

    return atomic_write(path, write)


def router_graph():
    """The router as an ONNX model: ``features (B, G)``, ``means (T, G)``, ``precisions (T, G, G)``, all
    float64 -> ``distances (B, T)`` float64, ``d[b, t] = (x_b - mu_t)^T P_t (x_b - mu_t)``."""
    import onnx
    from onnx import TensorProto, helper

    double = TensorProto.DOUBLE
    nodes = [
        helper.make_node("Constant", [], ["axis1"], value=helper.make_tensor("axis1", TensorProto.INT64, [1], [1])),
        helper.make_node("Constant", [], ["axis2"], value=helper.make_tensor("axis2", TensorProto.INT64, [1], [2])),
        helper.make_node("Unsqueeze", ["features", "axis1"], ["x"]),  # (B, 1, G)
        helper.make_node("Sub", ["x", "means"], ["diff"]),  # (B, T, G)
        helper.make_node("Transpose", ["diff"], ["diff_t"], perm=[1, 0, 2]),  # (T, B, G)
        helper.make_node("MatMul", ["diff_t", "precisions"], ["projected"]),  # (T, B, G)
        helper.make_node("Mul", ["projected", "diff_t"], ["terms"]),
        helper.make_node("ReduceSum", ["terms", "axis2"], ["sums"], keepdims=0),  # (T, B)
        helper.make_node("Transpose", ["sums"], ["distances"], perm=[1, 0]),  # (B, T)
    ]
    graph = helper.make_graph(
        nodes,
        "moleflow_router",
        [
            helper.make_tensor_value_info("features", double, ["batch", "G"]),
            helper.make_tensor_value_info("means", double, ["T", "G"]),
            helper.make_tensor_value_info("precisions", double, ["T", "G", "G"]),
        ],
        [helper.make_tensor_value_info("distances", double, ["batch", "T"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="moleflow")
    onnx.checker.check_model(model, full_check=True)
    return model
