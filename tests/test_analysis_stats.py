"""Known-answer tests for moleflow.analysis: ANOVA, Bonferroni, SVD rank, seed summaries, latent statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moleflow.analysis import (
    bonferroni,
    decompose_transform,
    effective_rank,
    interaction_table,
    latent_statistics,
    mean_std,
    pca_2d,
    summarize_over_seeds,
    svd_spectrum,
    two_way_anova,
)

N_PER_CELL = 10


def _design(cell_means: dict[tuple[int, int], float], noise: float, seed: int, n: int = N_PER_CELL):
    """Values ``(4n,)`` and the two factor columns for a 2x2 design with ``n`` replicates per cell."""
    rng = np.random.default_rng(seed)
    values, a, b = [], [], []
    for (i, j), mu in cell_means.items():
        values.extend(mu + noise * rng.standard_normal(n))
        a.extend([i] * n)
        b.extend([j] * n)
    return np.asarray(values), np.asarray(a), np.asarray(b)


def _closed_form_balanced(values: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, tuple[float, float]]:
    """Textbook balanced two-way ANOVA: ``{effect: (SS, F)}`` from cell, row, column and grand means."""
    levels_a, levels_b = np.unique(a), np.unique(b)
    n = len(values) // (len(levels_a) * len(levels_b))
    grand = values.mean()
    cell = np.array([[values[(a == i) & (b == j)].mean() for j in levels_b] for i in levels_a])
    row, col = cell.mean(axis=1), cell.mean(axis=0)
    ss = {
        "A": n * len(levels_b) * np.sum((row - grand) ** 2),
        "B": n * len(levels_a) * np.sum((col - grand) ** 2),
        "A:B": n * np.sum((cell - row[:, None] - col[None, :] + grand) ** 2),
    }
    fitted = cell[np.searchsorted(levels_a, a), np.searchsorted(levels_b, b)]
    df_error = len(values) - cell.size
    ms_error = np.sum((values - fitted) ** 2) / df_error
    dfs = {"A": len(levels_a) - 1, "B": len(levels_b) - 1, "A:B": (len(levels_a) - 1) * (len(levels_b) - 1)}
    return {k: (ss[k], ss[k] / dfs[k] / ms_error) for k in ss}


def test_planted_interaction_is_significant_and_large() -> None:
    values, a, b = _design({(0, 0): 0.0, (0, 1): 0.0, (1, 0): 0.0, (1, 1): 5.0}, noise=0.5, seed=0)
    inter = two_way_anova(values, a, b).interaction
    assert inter.p < 1e-6
    assert inter.partial_eta_sq > 0.8
    assert inter.df == 1


def test_additive_design_has_no_interaction() -> None:
    values, a, b = _design({(0, 0): 0.0, (0, 1): 1.0, (1, 0): 2.0, (1, 1): 3.0}, noise=0.5, seed=1)
    result = two_way_anova(values, a, b)
    assert result.interaction.p > 0.05
    assert result.interaction.partial_eta_sq < 0.1
    assert result.effects["A"].p < 1e-6 and result.effects["B"].p < 1e-6


def test_anova_matches_closed_form_on_balanced_design() -> None:
    values, a, b = _design({(0, 0): 0.3, (0, 1): 1.1, (1, 0): 2.0, (1, 1): 4.2}, noise=1.0, seed=2)
    result = two_way_anova(values, a, b)
    for effect, (ss, f) in _closed_form_balanced(values, a, b).items():
        assert result.effects[effect].ss == pytest.approx(ss, abs=1e-8)
        assert result.effects[effect].f == pytest.approx(f, abs=1e-8)
    assert result.df_error == 4 * N_PER_CELL - 4


def test_interaction_ss_on_unbalanced_design_equals_model_comparison() -> None:
    values, a, b = _design({(0, 0): 0.0, (0, 1): 1.0, (1, 0): 0.5, (1, 1): 3.0}, noise=1.0, seed=3)
    keep = np.ones(len(values), dtype=bool)
    keep[[0, 1, 2, 15, 33]] = False  # drop unequal numbers from cells
    values, a, b = values[keep], a[keep], b[keep]

    def sse(design: np.ndarray) -> float:
        coef, *_ = np.linalg.lstsq(design, values, rcond=None)
        return float(np.sum((values - design @ coef) ** 2))

    ones = np.ones_like(values)
    additive = np.column_stack([ones, a, b]).astype(float)
    full = np.column_stack([additive, a * b]).astype(float)
    result = two_way_anova(values, a, b)
    assert result.interaction.ss == pytest.approx(sse(additive) - sse(full), abs=1e-8)
    assert result.ss_error == pytest.approx(sse(full), abs=1e-8)


def test_anova_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="length"):
        two_way_anova([1.0, 2.0, 3.0], [0, 1, 0], [0, 1])


def test_bonferroni_by_hand() -> None:
    assert bonferroni([0.01, 0.02, 0.5]) == pytest.approx([0.03, 0.06, 1.0])
    assert bonferroni([0.01, 0.02], n_tests=10) == pytest.approx([0.1, 0.2])
    with pytest.raises(ValueError):
        bonferroni([0.1, 0.2], n_tests=1)


def test_interaction_table_classifies_core_and_general() -> None:
    planted, frozen_p, on_p = _design({(0, 0): 0.0, (0, 1): 0.0, (1, 0): 0.0, (1, 1): 5.0}, noise=0.5, seed=4)
    additive, frozen_a, on_a = _design({(0, 0): 0.0, (0, 1): 1.0, (1, 0): 2.0, (1, 1): 3.0}, noise=0.5, seed=1)
    rows = interaction_table({"dia": (planted, frozen_p, on_p), "whitening": (additive, frozen_a, on_a)})
    assert [r.component for r in rows] == ["dia", "whitening"]
    dia, white = rows
    assert dia.category == "core" and white.category == "general"
    assert dia.p_bonferroni == pytest.approx(min(1.0, 2 * dia.p_raw))
    assert white.p_bonferroni == pytest.approx(min(1.0, 2 * white.p_raw))
    expected = planted[on_p == 1].mean() - planted[on_p == 0].mean()
    assert dia.main_effect == pytest.approx(expected) and dia.main_effect == pytest.approx(2.5, abs=0.3)
    assert white.main_effect == pytest.approx(1.0, abs=0.3)


def _with_singular_values(sv: list[float], shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))
    middle = np.zeros(shape)
    middle[: len(sv), : len(sv)] = np.diag(sv)
    return u @ middle @ v.T


@pytest.mark.parametrize(
    ("energy", "rank"),
    # energies of (10, 5, 1, 0.1): cumulative 100, 125, 126, 126.01 out of 126.01
    # = 0.79359, 0.99198, 0.99992, 1.0
    [(0.5, 1), (0.79, 1), (0.8, 2), (0.9, 2), (0.99, 2), (0.992, 3), (0.9999, 3), (0.99995, 4), (1.0, 4)],
)
def test_effective_rank_known_spectrum(energy: float, rank: int) -> None:
    assert effective_rank(_with_singular_values([10, 5, 1, 0.1], (7, 5)), energy) == rank


def test_effective_rank_rank_one_and_zero() -> None:
    rng = np.random.default_rng(0)
    rank_one = np.outer(rng.standard_normal(6), rng.standard_normal(4))
    assert effective_rank(rank_one, 0.99) == 1
    assert effective_rank(rank_one, 1.0) == 1
    assert effective_rank(np.zeros((3, 3)), 0.9) == 0


def test_svd_spectrum_normalised() -> None:
    spectrum = svd_spectrum(_with_singular_values([10, 5, 1, 0.1], (7, 5)))
    np.testing.assert_allclose(spectrum, [1.0, 0.5, 0.1, 0.01, 0.0], atol=1e-12)


def test_mean_std_and_seed_summary() -> None:
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5 / 3))
    assert math.isnan(mean_std([1.0])[1])
    summary = summarize_over_seeds([{"auroc": 0.9, "ap": 0.5}, {"auroc": 0.8, "ap": 0.7}])
    assert summary["auroc"] == pytest.approx((0.85, math.sqrt(0.005)))
    assert summary["ap"] == pytest.approx((0.6, math.sqrt(0.02)))
    with pytest.raises(ValueError, match="metrics"):
        summarize_over_seeds([{"auroc": 0.9}, {"ap": 0.5}])


def test_latent_statistics_standard_normal() -> None:
    z = np.random.default_rng(0).standard_normal((20000, 8))
    stats = latent_statistics(z)
    assert stats["mean_norm"] < 0.05
    assert stats["mean_std"] == pytest.approx(1.0, abs=0.02)
    assert stats["mean_kurtosis"] == pytest.approx(3.0, abs=0.15)
    assert stats["mean_abs_skew"] < 0.05
    assert latent_statistics(torch.from_numpy(z)) == pytest.approx(stats)


def test_decompose_exact_affine() -> None:
    z = np.random.default_rng(0).standard_normal((500, 4))
    out = decompose_transform(z, 2 * z + 1)
    assert out["residual_share"] < 1e-20
    np.testing.assert_allclose(out["s"], 2.0, atol=1e-12)
    np.testing.assert_allclose(out["m"], 1.0, atol=1e-12)
    shares = out["scale_share"] + out["shift_share"] + out["residual_share"]
    assert shares == pytest.approx(1.0)
    assert out["delta_norm"] == pytest.approx(np.linalg.norm(z + 1))


def test_decompose_pure_shift_and_pure_scale() -> None:
    z = np.random.default_rng(1).standard_normal((500, 3))
    shift = decompose_transform(z, z + np.array([0.5, -1.0, 2.0]))
    assert shift["shift_share"] == pytest.approx(1.0)
    np.testing.assert_allclose(shift["s"], 1.0, atol=1e-12)
    np.testing.assert_allclose(shift["m"], [0.5, -1.0, 2.0], atol=1e-12)
    centred = z - z.mean(axis=0)
    assert decompose_transform(centred, 3 * centred)["scale_share"] == pytest.approx(1.0)


def test_decompose_shares_split_delta_energy_exactly() -> None:
    z = np.random.default_rng(2).standard_normal((1000, 3)) + 0.7
    out = decompose_transform(z, np.tanh(z) * 1.5 + 0.2)
    assert out["residual_share"] > 0.0
    s, m = out["s"], out["m"]
    mu = z.mean(axis=0)
    parts = [(s - 1) * (z - mu), np.broadcast_to((s - 1) * mu + m, z.shape), np.tanh(z) * 1.5 + 0.2 - s * z - m]
    assert sum(float(np.sum(p**2)) for p in parts) == pytest.approx(out["delta_norm"] ** 2)


def test_pca_2d_recovers_axes_and_reuses_basis() -> None:
    z = np.random.default_rng(0).standard_normal((5000, 3)) * np.array([3.0, 2.0, 0.1])
    coords, components = pca_2d(z)
    assert coords.shape == (5000, 2) and components.shape == (2, 3)
    np.testing.assert_allclose(np.abs(components), np.eye(3)[:2], atol=0.05)
    assert (components[np.arange(2), np.abs(components).argmax(axis=1)] > 0).all()
    np.testing.assert_allclose(coords.var(axis=0), [9.0, 4.0], rtol=0.1)
    shifted, _ = pca_2d(z + np.array([1.0, 0.0, 0.0]), basis_from=z)
    np.testing.assert_allclose(shifted - coords, np.broadcast_to(components[:, 0], coords.shape), atol=1e-12)
