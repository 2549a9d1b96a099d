"""Feature adapters before the flow: whitening (per task), spatial context mixer, scale context.

All act on channel-last patch grids ``(B, H, W, D)`` and are not part of the density's change of
variables (the flow's log-determinant starts after them), exactly as in the outline's pipeline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moleflow.config import ScaleContextConfig, SpatialMixerConfig, WhiteningConfig


class WhiteningAdapter(nn.Module):
    """One task's whitening adapter (outline 3.3.1)::

        F2 = gamma_t * LayerNorm(F1) + beta_t,
        gamma_t = lo + (hi - lo) * sigmoid(gamma_raw)  in [0.5, 2],   beta_t = beta_max * tanh(beta_raw)

    The normalisation is a parameter-free LayerNorm over the channels of each patch (the v5 code).
    The outline's formula takes per-channel statistics over batch and space instead; we do not, because
    then an image's score would depend on the other images of its batch.
    """

    def __init__(self, dim: int, cfg: WhiteningConfig, gamma_raw: torch.Tensor, beta_raw: torch.Tensor) -> None:
        super().__init__()
        self.dim = dim
        self.gamma_low, self.gamma_high = cfg.gamma_range
        self.beta_max = cfg.beta_max
        self.eps = cfg.eps
        self.gamma_raw = nn.Parameter(gamma_raw.detach().clone().reshape(dim))
        self.beta_raw = nn.Parameter(beta_raw.detach().clone().reshape(dim))

    @classmethod
    def near_identity(cls, dim: int, cfg: WhiteningConfig) -> WhiteningAdapter:
        """The first task's start: gamma ~= 1 (raw = -0.7), beta = 0."""
        return cls(dim, cfg, torch.full((dim,), cfg.first_task_gamma_raw), torch.zeros(dim))

    @classmethod
    def midpoint(cls, dim: int, cfg: WhiteningConfig) -> WhiteningAdapter:
        """v5's start for later tasks: raw = 0, i.e. gamma at the middle of its range, beta = 0."""
        return cls(dim, cfg, torch.zeros(dim), torch.zeros(dim))

    @property
    def gamma(self) -> torch.Tensor:
        return self.gamma_low + (self.gamma_high - self.gamma_low) * torch.sigmoid(self.gamma_raw)

    @property
    def beta(self) -> torch.Tensor:
        return self.beta_max * torch.tanh(self.beta_raw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, H, W, D) -> (B, H, W, D)``."""
        return self.gamma * F.layer_norm(x, (self.dim,), eps=self.eps) + self.beta

    def identity_penalty(self) -> torch.Tensor:
        """``mean((gamma - 1)^2) + mean(beta^2)``: zero exactly at the identity de-whitening."""
        return (self.gamma - 1.0).pow(2).mean() + self.beta.pow(2).mean()


def _depthwise(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Apply a channel-first conv to a channel-last grid: ``(B, H, W, C) -> (B, H, W, C')`` in ``x``'s dtype
    (float32 under bf16 autocast, see moleflow.precision)."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).to(x.dtype)


class SpatialContextMixer(nn.Module):
    """Gated depthwise aggregation (outline 3.3.2): ``F3 = (1 - a) F2 + a DWConv(F2)``, ``a = sigmoid(g)``.

    The convolution is shared (base). The gate is shared too (v5: trained on the first task, then frozen)
    or one scalar per task (outline: a task-specific alpha). The kernel starts as a local mean filter.
    """

    task_containers = ("gates",)

    def __init__(self, dim: int, cfg: SpatialMixerConfig) -> None:
        super().__init__()
        k = cfg.kernel_size
        self.conv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False)
        nn.init.constant_(self.conv.weight, 1.0 / (k * k))
        self.gate_init = cfg.gate_init
        self.per_task = cfg.gate == "per_task"
        self.gate = None if self.per_task else nn.Parameter(torch.tensor(float(cfg.gate_init)))
        self.gates = nn.ParameterDict()

    def add_task(self, task: str) -> None:
        if self.per_task:
            weight = self.conv.weight
            self.gates[task] = nn.Parameter(weight.new_tensor(float(self.gate_init)))

    def remove_task(self, task: str) -> None:
        if task in self.gates:
            del self.gates[task]

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """``x (B, H, W, D) -> (B, H, W, D)``."""
        alpha = torch.sigmoid(self.gates[task] if self.per_task else self.gate)
        return torch.lerp(x, _depthwise(x, self.conv), alpha)


class ScaleContext(nn.Module):
    """Scale context (outline 3.3.3): ``DWConv_k(W_proj [Pool(F_layer2); F_layer3] + b)``, added to F1.

    Input: the backbone's raw multi-layer maps on the patch grid, ``(B, H, W, C_ctx)``
    (1536 channels for WideResNet-50 layer2 + layer3). Shared (base) parameters.
    """

    def __init__(self, context_dim: int, dim: int, cfg: ScaleContextConfig) -> None:
        super().__init__()
        k = cfg.kernel_size
        self.proj = nn.Linear(context_dim, dim)
        self.conv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """``context (B, H, W, C_ctx) -> (B, H, W, D)``."""
        return _depthwise(self.proj(context), self.conv)
