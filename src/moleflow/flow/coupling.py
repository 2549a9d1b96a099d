"""AllInOne-style affine coupling block on channel-last patch grids (FrEIA ``AllInOneBlock``, notes 4).

Forward, for ``x (B, H, W, D)`` split into ``x1`` (first ``D - D//2`` channels) and ``x2`` (last ``D//2``)::

    a        = 0.1 * subnet(x1, task)                  # (B, H, W, 2 * D//2); FrEIA's x0.1 damping
    s        = clamp * tanh(a[..., :D//2])              # soft-clamped log-scales, |s| < clamp (1.9)
    y2       = x2 * exp(s) + a[..., D//2:]
    u        = [x1, y2] * g + o                         # global affine, g = 0.1 * softplus_{beta=0.5}(raw)
    y        = u[..., perm]                             # fixed random channel permutation
    log|det| = sum(s) + sum(log g)                      # per patch, shape (B, H, W)

The block's own parameters (global scale/offset) and the subnet's base weights are shared; only the
subnet's LoRA adapters are per task. Sign convention (FrEIA's): ``forward`` returns ``log|det J|`` and
``inverse`` returns ``-log|det J|`` of the forward map at the recovered input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _PermuteChannels(torch.autograd.Function):
    """``gather`` along the last axis whose backward is the inverse permutation's ``gather``.

    autograd's own backward of ``gather`` zero-fills a full-size tensor and scatter-adds into it (two
    passes, one of them slow); a permutation's adjoint is its inverse, one ``gather``. Same gradient values.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.gather(-1, index.expand(x.shape))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.gather(-1, inverse.expand(grad.shape)), None, None


def permute_channels(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., index]`` for a permutation ``index (D,)`` of the last axis, as a ``gather``.

    Same values bit for bit; on a CPU it is faster than advanced indexing of the last axis, forward and in
    its backward (measured on the offline head by benchmarks/head_ab.py: 1.1 - 1.3x per training step, 1.1 -
    1.2x per inference; docs/PERFORMANCE.md, "Speed levers"). With ``inverse`` (``argsort(index)``) given and
    autograd recording, the backward is a gather by ``inverse`` (:class:`_PermuteChannels`); without autograd
    (inference, tracing for ONNX) it is the plain ``gather``.
    """
    if inverse is not None and torch.is_grad_enabled() and x.requires_grad:
        return _PermuteChannels.apply(x, index, inverse)
    return x.gather(-1, index.expand(x.shape))


def random_permutation(dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(dim, generator=generator)


class AllInOneCoupling(nn.Module):
    def __init__(
        self,
        dim: int,
        subnet_constructor,
        *,
        clamp: float,
        permutation: torch.Tensor,
        global_affine_init: float = 1.0,
    ) -> None:
        super().__init__()
        if permutation.shape != (dim,) or not torch.equal(permutation.sort().values, torch.arange(dim)):
            raise ValueError(f"permutation must be a permutation of range({dim})")
        self.dim = dim
        self.passive = dim - dim // 2
        self.active = dim // 2
        self.clamp = clamp
        self.subnet = subnet_constructor(self.passive, 2 * self.active)
        # softplus_{beta=0.5}(raw) * 0.1 = global_affine_init at creation (FrEIA's SOFTPLUS parametrisation)
        raw = 2.0 * math.log(math.exp(0.5 * 10.0 * global_affine_init) - 1.0)
        self.global_scale = nn.Parameter(torch.full((dim,), raw))
        self.global_offset = nn.Parameter(torch.zeros(dim))
        self.register_buffer("perm", permutation.clone())
        self.register_buffer("inv_perm", torch.argsort(permutation))

    def global_scale_value(self) -> torch.Tensor:
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def _coefficients(self, x1: torch.Tensor, task: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, t)`` of the active half, each ``(B, H, W, D//2)``.

        Under bf16 autocast the subnet's output is bf16: it goes back to the input's dtype before tanh/exp
        and the log-det sum, so that the latent and the scores stay float32 (moleflow.precision).
        """
        a = 0.1 * self.subnet(x1, task).to(x1.dtype)
        # split, not two slices: the backward of a split is one cat, that of each slice a zero-filled copy
        s_raw, t = a.split(self.active, dim=-1)
        return self.clamp * torch.tanh(s_raw), t

    def forward(self, x: torch.Tensor, task: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, H, W, D) -> (y (B, H, W, D), log|det J| (B, H, W))``."""
        x1, x2 = x.split([self.passive, self.active], dim=-1)
        s, t = self._coefficients(x1, task)
        u = torch.cat([x1, x2 * torch.exp(s) + t], dim=-1)
        g = self.global_scale_value()
        y = permute_channels(u * g + self.global_offset, self.perm, self.inv_perm)
        return y, s.sum(dim=-1) + torch.log(g).sum()

    def inverse(self, y: torch.Tensor, task: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``y (B, H, W, D) -> (x, -log|det J| (B, H, W))``."""
        g = self.global_scale_value()
        u = (permute_channels(y, self.inv_perm, self.perm) - self.global_offset) / g
        x1, y2 = u.split([self.passive, self.active], dim=-1)
        s, t = self._coefficients(x1, task)
        x = torch.cat([x1, (y2 - t) * torch.exp(-s)], dim=-1)
        return x, -(s.sum(dim=-1) + torch.log(g).sum())


class CouplingFlow(nn.Module):
    """A sequence of :class:`AllInOneCoupling` blocks sharing one task argument."""

    def __init__(self, blocks: list[AllInOneCoupling]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, task: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, H, W, D) -> (z, log|det J| (B, H, W))``."""
        logdet = x.new_zeros(x.shape[:-1])
        for block in self.blocks:
            x, ld = block(x, task)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor, task: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = z.new_zeros(z.shape[:-1])
        for block in reversed(self.blocks):
            z, ld = block.inverse(z, task)
            logdet = logdet + ld
        return z, logdet
