"""Statistics of flow latents before/after DIA (outline 3.4.3.1): moments, affine decomposition, 2-D PCA.

Inputs are ``(N, D)`` arrays (N samples, e.g. patches, of D latent dims); torch tensors are accepted and moved
to CPU numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats as sps


def _as_matrix(z: Any, name: str = "z") -> np.ndarray:
    if hasattr(z, "detach"):
        z = z.detach().cpu().numpy()
    arr = np.asarray(z, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError(f"Expected {name} of shape (N, D) with N >= 2, got {arr.shape}")
    return arr


def latent_statistics(z: Any) -> dict[str, float]:
    """Gaussianity summary of ``z (N, D)``; a standard normal gives about ``(0, 1, 3, 0)``.

    - ``mean_norm``: ||mean over samples||_2 of the D-vector of per-dimension means;
    - ``mean_std``: per-dimension std (ddof=1) averaged over D;
    - ``mean_kurtosis``: Pearson kurtosis (normal = 3, not excess) per dimension, averaged over D;
    - ``mean_abs_skew``: |skewness| per dimension, averaged over D.
    """
    x = _as_matrix(z)
    return {
        "mean_norm": float(np.linalg.norm(x.mean(axis=0))),
        "mean_std": float(x.std(axis=0, ddof=1).mean()),
        "mean_kurtosis": float(np.mean(sps.kurtosis(x, axis=0, fisher=False))),
        "mean_abs_skew": float(np.mean(np.abs(sps.skew(x, axis=0)))),
    }


def _fit_affine(zb: np.ndarray, za: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension least squares ``za[:, d] ≈ s[d] * zb[:, d] + m[d]``; a constant input dim gets s = 1."""
    mb, ma = zb.mean(axis=0), za.mean(axis=0)
    var = ((zb - mb) ** 2).mean(axis=0)
    cov = ((zb - mb) * (za - ma)).mean(axis=0)
    safe = var > 0
    s = np.where(safe, cov / np.where(safe, var, 1.0), 1.0)
    return s, ma - s * mb


def decompose_transform(z_before: Any, z_after: Any) -> dict[str, Any]:
    """Split the change ``delta = z_after - z_before`` (both ``(N, D)``) into scale, shift and residual.

    Per dimension d, fit ``z_after ≈ s_d * z_before + m_d`` by least squares, and with ``mu_d`` the mean of
    ``z_before[:, d]`` write, exactly,

        delta = (s - 1) * (z_before - mu)        # scale: stretch about the mean
              + ((s - 1) * mu + m)               # shift: the change of the per-dimension mean
              + (z_after - s * z_before - m)     # residual: what no per-dimension affine map explains

    The three parts are orthogonal per dimension (centred / constant / least-squares residual), so their
    squared Frobenius norms over all samples and dims add up to ``||delta||²``, and
    ``share_k = ||part_k||² / ||delta||²`` sums to 1 (all shares are 0 when delta is 0).
    Centring the scale part is what makes the split exact; uncentred ``(s - 1) * z_before`` and ``m`` overlap
    whenever ``mu != 0``.

    Returns ``scale_share``, ``shift_share``, ``residual_share``, ``delta_norm`` (= ||delta||_F) and the fitted
    ``s (D,)`` and ``m (D,)``.
    """
    zb, za = _as_matrix(z_before, "z_before"), _as_matrix(z_after, "z_after")
    if zb.shape != za.shape:
        raise ValueError(f"Expected z_before and z_after of the same shape, got {zb.shape} and {za.shape}")
    s, m = _fit_affine(zb, za)
    mu = zb.mean(axis=0)
    energies = {
        "scale": float(np.sum(((s - 1.0) * (zb - mu)) ** 2)),
        "shift": float(zb.shape[0] * np.sum(((s - 1.0) * mu + m) ** 2)),
        "residual": float(np.sum((za - s * zb - m) ** 2)),
    }
    total = sum(energies.values())
    shares = {f"{k}_share": (v / total if total > 0 else 0.0) for k, v in energies.items()}
    return {**shares, "delta_norm": float(np.linalg.norm(za - zb)), "s": s, "m": m}


def pca_2d(z: Any, basis_from: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Project ``z (N, D)`` onto the top two principal axes -> ``(coords (N, 2), components (2, D))``.

    The mean and axes come from ``basis_from (M, D)`` when given (e.g. fit on the latents before DIA and
    project both before and after into the same plane), else from ``z``. Each axis's sign is fixed so its
    largest-magnitude entry is positive, making plots reproducible.
    """
    x = _as_matrix(z)
    basis = x if basis_from is None else _as_matrix(basis_from, "basis_from")
    if basis.shape[1] != x.shape[1] or x.shape[1] < 2:
        raise ValueError(f"Expected z and basis_from with the same D >= 2, got {x.shape} and {basis.shape}")
    mean = basis.mean(axis=0)
    _, _, vt = np.linalg.svd(basis - mean, full_matrices=False)
    components = vt[:2]
    signs = np.sign(components[np.arange(2), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    return (x - mean) @ components.T, components
