"""Coupling subnets built from LoRA linears; a factory picks one by name (FrEIA's subnet_constructor idea).

Every subnet maps the passive half ``x1 (B, H, W, C_in)`` to the coefficients ``(B, H, W, C_out)`` of
the active half (``C_out = 2 * C_active``: scales first, then shifts) for a given task.

- ``mlp`` (v5 notes, component 6): ``LoRALinear(C_in -> h) -> ReLU -> LoRALinear(h -> C_out)``.
- ``context`` (outline 3.4.1, MoLEContextSubnet): the s-net sees ``[x1; ctx]`` where
  ``ctx = alpha_max * sigmoid(theta) * DWConv3x3(x1)`` on the 2D patch grid (local contrast), the t-net
  sees ``x1`` only. The depthwise conv and ``theta`` are shared base parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moleflow.config import FlowConfig
from moleflow.flow.lora import LoRALinear


class MLPSubnet(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int, cfg: FlowConfig) -> None:
        super().__init__()
        self.layer1 = LoRALinear(in_dim, hidden, cfg.lora)
        self.layer2 = LoRALinear(hidden, out_dim, cfg.lora)

    def forward(self, x: torch.Tensor, task: str | None) -> torch.Tensor:
        """``x (B, H, W, C_in) -> (B, H, W, C_out)``."""
        return self.layer2(F.relu(self.layer1(x, task)), task)


class ContextSubnet(nn.Module):
    """Context-aware s-net and context-free t-net (MoLEContextSubnet)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, cfg: FlowConfig) -> None:
        super().__init__()
        if out_dim % 2:
            raise ValueError(f"context subnet needs an even output width (scales + shifts), got {out_dim}")
        half = out_dim // 2
        k = cfg.context_kernel
        self.context_conv = nn.Conv2d(in_dim, in_dim, k, padding=k // 2, groups=in_dim, bias=False)
        self.context_gate = nn.Parameter(torch.zeros(()))  # theta_scale; sigmoid(0) = 0.5
        self.alpha_max = cfg.context_alpha_max
        self.s_layer1 = LoRALinear(2 * in_dim, hidden, cfg.lora)
        self.s_layer2 = LoRALinear(hidden, half, cfg.lora)
        self.t_layer1 = LoRALinear(in_dim, hidden, cfg.lora)
        self.t_layer2 = LoRALinear(hidden, half, cfg.lora)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """Gated local context of ``x (B, H, W, C)`` on its patch grid, same shape."""
        local = self.context_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.alpha_max * torch.sigmoid(self.context_gate) * local

    def forward(self, x: torch.Tensor, task: str | None) -> torch.Tensor:
        """``x (B, H, W, C_in) -> (B, H, W, C_out)``; scales use the neighbourhood, shifts do not."""
        s = self.s_layer2(F.relu(self.s_layer1(torch.cat([x, self.context(x)], dim=-1), task)), task)
        t = self.t_layer2(F.relu(self.t_layer1(x, task)), task)
        return torch.cat([s, t], dim=-1)


SubnetFactory = Callable[[int, int], nn.Module]

_SUBNETS: dict[str, type[nn.Module]] = {"mlp": MLPSubnet, "context": ContextSubnet}


def subnet_factory(cfg: FlowConfig) -> SubnetFactory:
    """A constructor ``(in_dim, out_dim) -> subnet`` for the subnet kind named in ``cfg.subnet``."""
    try:
        cls = _SUBNETS[cfg.subnet]
    except KeyError:
        raise ValueError(f"unknown subnet {cfg.subnet!r}; choose one of {sorted(_SUBNETS)}") from None

    def build(in_dim: int, out_dim: int) -> nn.Module:
        hidden = max(1, round(cfg.hidden_ratio * in_dim))
        return cls(in_dim, out_dim, hidden, cfg)

    return build
