"""Compute precision of the flow head: float32, or bfloat16 matrix products under autocast.

``precision`` is ``"fp32"``, ``"bf16"`` or ``"auto"``. Under ``"bf16"`` the head's matrix products and
convolutions run in bfloat16 (``torch.autocast``), while the state that flows through the couplings, the
log-determinants and the scores stay float32: each coupling casts its subnet's output back to the input's
dtype before the exp/tanh math (``moleflow.flow.coupling``), so bf16 rounding enters only through the
subnets' inputs and weights (relative 2^-9), not through the accumulated latent. Parameters, gradients and
optimizer state stay float32 (autocast keeps the master weights).

``"auto"`` picks bf16 only where the hardware does bf16 matmuls natively and ``moleflow bench`` measured
them to pay: a CUDA device with bf16 support, or a CPU with AMX tiles (Intel Sapphire Rapids and later,
where oneDNN runs bf16 matmuls on AMX at about 10x the float32 rate; "precision levers" in
docs/PERFORMANCE.md). Everywhere else, including CPUs with only AVX-512 BF16 (not measured), it is fp32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "auto"]
PRECISIONS = ("fp32", "bf16", "auto")


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles that torch can use for bf16 matmuls (oneDNN)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # the kernel refused to enable the tiles
        return False


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 matrix products are native (and measured to pay) on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_amx()
    return False


def resolve(precision: str, device: torch.device | str) -> Literal["fp32", "bf16"]:
    """``"auto"`` -> ``"bf16"`` where :func:`bf16_is_fast`, else ``"fp32"``; the others unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision  # type: ignore[return-value]


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str) -> Iterator[Literal["fp32", "bf16"]]:
    """Run the block at ``precision`` on ``device``'s type; yields the resolved precision.

    ``fp32`` also switches off an autocast region around it, so an fp32 call means fp32 everywhere.
    """
    device = torch.device(device)
    resolved = resolve(precision, device)
    kind = device.type if device.type in ("cpu", "cuda", "xpu", "mps") else "cpu"
    with torch.autocast(kind, dtype=torch.bfloat16, enabled=resolved == "bf16"):
        yield resolved
