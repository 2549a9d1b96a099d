"""2D sinusoidal positional encoding (outline 3.2.2; implementation notes, component 2).

The flow scores every patch independently, so without a position signal it cannot learn that, say,
a bright rim is normal at the border of a part and anomalous at its centre. Channel layout, for
``i = 0 .. D/4 - 1`` and ``w_i = 10000 ** (-i / (D/4))``::

    pe[y, x, 4i]   = sin(x * w_i)      pe[y, x, 4i+1] = cos(x * w_i)
    pe[y, x, 4i+2] = sin(y * w_i)      pe[y, x, 4i+3] = cos(y * w_i)
"""

from __future__ import annotations

import math

import torch


def positional_encoding_2d(
    height: int, width: int, dim: int, *, device: torch.device | str | None = None, dtype=torch.float32
) -> torch.Tensor:
    """Return the encoding ``P`` of shape ``(height, width, dim)``; ``dim`` must be divisible by 4."""
    if dim % 4:
        raise ValueError(f"2D positional encoding needs a feature dimension divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = torch.exp(torch.arange(quarter, dtype=torch.float64) * (-math.log(10000.0) / quarter))
    xs = torch.arange(width, dtype=torch.float64)[:, None] * freqs  # (W, D/4)
    ys = torch.arange(height, dtype=torch.float64)[:, None] * freqs  # (H, D/4)
    pe = torch.empty(height, width, quarter, 4, dtype=torch.float64)
    pe[..., 0] = torch.sin(xs)[None, :, :]
    pe[..., 1] = torch.cos(xs)[None, :, :]
    pe[..., 2] = torch.sin(ys)[:, None, :]
    pe[..., 3] = torch.cos(ys)[:, None, :]
    return pe.reshape(height, width, dim).to(device=device, dtype=dtype)
