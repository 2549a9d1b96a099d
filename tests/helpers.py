"""Small synthetic fixtures shared by the model-level tests."""

from __future__ import annotations

import struct
import zlib

import torch

from moleflow.config import MoleFlowConfig, apply_overrides, preset
from moleflow.features.cache import CachedFeatures


def tiny_config(name: str = "offline", *extra: str) -> MoleFlowConfig:
    return apply_overrides(
        preset(name),
        [
            "model.backbone.embed_dim=16",
            "model.flow.lora.rank=4",
            "model.flow.coupling_layers=4",
            "train.epochs=3",
            "train.batch_size=8",
            *extra,
        ],
    )


def task_features(
    shift: float, n: int = 24, seed: int = 0, dim: int = 16, grid: int = 4, context_dim: int | None = None
) -> CachedFeatures:
    """Gaussian patch features around ``shift``: tasks with far-apart shifts are easy to route."""
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(n, grid, grid, dim, generator=g) + shift
    context = None if context_dim is None else torch.randn(n, grid, grid, context_dim, generator=g)
    return CachedFeatures(patches, context, patches.mean(dim=(1, 2)) + 0.1 * torch.randn(n, dim, generator=g))


def small_model_cfg(name: str, dim: int = 8, layers: int = 3, rank: int = 4, extra: tuple[str, ...] = ()):
    """A preset's model section shrunk for exact float64 math tests (scale = alpha/rank kept moderate)."""
    alpha = 1 if name == "v5" else rank
    overrides = [
        f"model.backbone.embed_dim={dim}",
        f"model.flow.coupling_layers={layers}",
        f"model.flow.lora.rank={rank}",
        f"model.flow.lora.alpha={alpha}",
        *extra,
    ]
    return apply_overrides(preset(name), overrides).model


@torch.no_grad()
def perturb(module: torch.nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Add noise to every parameter (zero-initialised LoRA B, DIA outputs too): maps become non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def build_perturbed_model(name: str, tasks=("t0", "t1"), seed: int = 0, context_dim: int = 6, **kw):
    """A float64 MoLEFlow from :func:`small_model_cfg` with ``tasks`` added and every parameter perturbed."""
    from moleflow.flow.model import MoLEFlow

    torch.manual_seed(seed)
    cfg = small_model_cfg(name, **kw)
    model = MoLEFlow(cfg, context_dim=context_dim if cfg.scale_context is not None else None)
    for t in tasks:
        model.add_task(t)
    model.double()
    perturb(model, seed=seed + 1)
    return model


# ----------------------------------------------------------------------------- tiny end-to-end runs

TINY = ["train.epochs=2", "model.flow.coupling_layers=2", "model.flow.lora.rank=4"]
TINY_LIMITS = "20,10"


def learn_args(run_dir, *products, extra=()):
    """``moleflow learn`` arguments for a tiny, fast run."""
    sets = [a for s in TINY for a in ("--set", s)]
    return ["learn", str(run_dir), *products, "--limits", TINY_LIMITS, "--no-progress", *sets, *extra]


# ----------------------------------------------------------------------------- image files


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` RGB pixels but holds no pixel data (a decompression-bomb header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
