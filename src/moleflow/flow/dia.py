"""Deep invertible adapter (outline 3.4.3): a small task-owned flow after the shared one.

Each block splits ``z (B, H, W, D)`` into halves, alternating which half is passive, and applies::

    (s_raw, t) = SimpleSubnet(z_passive)          # Linear(D/2 -> hidden) -> ReLU -> Linear(hidden -> D)
    s          = clamp * tanh(s_raw / clamp)       # soft clamp of the outline (alpha_clamp = 1.9)
    z_active'  = z_active * exp(s) + t             # log|det| = sum(s)

The subnet's output layer is zero-initialised, so a new adapter is exactly the identity; hidden
weights are Xavier-uniform, biases zero. Every parameter belongs to one task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moleflow.config import DIAConfig


class DIACoupling(nn.Module):
    def __init__(self, dim: int, hidden: int, clamp: float, passive_first: bool) -> None:
        super().__init__()
        self.half = dim // 2
        self.clamp = clamp
        self.passive_first = passive_first
        self.hidden_layer = nn.Linear(self.half, hidden)
        self.out_layer = nn.Linear(hidden, 2 * self.half)
        nn.init.xavier_uniform_(self.hidden_layer.weight)
        nn.init.zeros_(self.hidden_layer.bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x.split(self.half, dim=-1)  # one cat in the backward, not two zero-filled copies
        return (a, b) if self.passive_first else (b, a)

    def _join(self, passive: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return torch.cat([passive, active] if self.passive_first else [active, passive], dim=-1)

    def _coefficients(self, passive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.out_layer(F.relu(self.hidden_layer(passive))).to(passive.dtype)  # float32 under bf16 autocast
        s_raw, t = out.split(self.half, dim=-1)
        return self.clamp * torch.tanh(s_raw / self.clamp), t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, H, W, D) -> (y, log|det J| (B, H, W))``."""
        passive, active = self._split(x)
        s, t = self._coefficients(passive)
        return self._join(passive, active * torch.exp(s) + t), s.sum(dim=-1)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        passive, active = self._split(y)
        s, t = self._coefficients(passive)
        return self._join(passive, (active - t) * torch.exp(-s)), -s.sum(dim=-1)


class DeepInvertibleAdapter(nn.Module):
    """``cfg.blocks`` couplings with alternating halves; starts as the identity map."""

    def __init__(self, dim: int, cfg: DIAConfig) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"the DIA needs an even feature dimension, got {dim}")
        hidden = max(1, round(cfg.hidden_ratio * dim))
        self.blocks = nn.ModuleList(
            DIACoupling(dim, hidden, cfg.clamp, passive_first=(i % 2 == 0)) for i in range(cfg.blocks)
        )

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = z.new_zeros(z.shape[:-1])
        for block in self.blocks:
            z, ld = block(z)
            logdet = logdet + ld
        return z, logdet

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = z.new_zeros(z.shape[:-1])
        for block in reversed(self.blocks):
            z, ld = block.inverse(z)
            logdet = logdet + ld
        return z, logdet
