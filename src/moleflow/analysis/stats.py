"""Pure statistics for the analysis tables: two-way ANOVA (outline 3.3), Bonferroni, SVD rank of LoRA updates (3.4.1.1).

Everything takes plain sequences / numpy arrays and returns typed results; no torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from statsmodels.stats.anova import anova_lm

EFFECTS: tuple[str, ...] = ("A", "B", "A:B")
_TERMS: Mapping[str, str] = {"A": "C(a, Sum)", "B": "C(b, Sum)", "A:B": "C(a, Sum):C(b, Sum)"}
ALPHA: float = 0.05


@dataclass(frozen=True)
class EffectStats:
    """One ANOVA row: sum of squares, degrees of freedom, F, p and partial eta² = SS / (SS + SS_error)."""

    ss: float
    df: float
    f: float
    p: float
    partial_eta_sq: float


@dataclass(frozen=True)
class AnovaResult:
    """Two-way ANOVA with interaction; ``effects`` is keyed by ``"A"``, ``"B"``, ``"A:B"``."""

    effects: dict[str, EffectStats]
    ss_error: float
    df_error: float

    @property
    def interaction(self) -> EffectStats:
        """The ``A:B`` row."""
        return self.effects["A:B"]


@dataclass(frozen=True)
class InteractionRow:
    """One component of the interaction table (outline 3.3).

    ``main_effect`` is mean(metric | component on) - mean(metric | component off), in the metric's units;
    ``f``/``p_raw``/``partial_eta_sq`` are of the frozen x component interaction; ``p_bonferroni`` is corrected
    over all components of the table; ``category`` is ``"core"`` when ``p_bonferroni < 0.05`` else ``"general"``.
    """

    component: str
    main_effect: float
    f: float
    p_raw: float
    p_bonferroni: float
    partial_eta_sq: float
    category: str


def _check_lengths(values: np.ndarray, *factors: Sequence[object]) -> None:
    for factor in factors:
        if len(factor) != len(values):
            raise ValueError(f"Expected factors of length {len(values)} (one level per value), got {len(factor)}")


def two_way_anova(values: Sequence[float], factor_a: Sequence[object], factor_b: Sequence[object]) -> AnovaResult:
    """Two-way ANOVA ``value ~ A * B`` for an a x b design with replicates (balanced or not).

    ``values (N,)``; ``factor_a (N,)`` and ``factor_b (N,)`` hold each observation's level (any hashable).
    Uses statsmodels OLS with sum-to-zero contrasts and type-III sums of squares: each main effect is then
    tested at the unweighted average over the other factor's levels, which stays meaningful when the design
    is unbalanced *and* an interaction is present (type II would assume no interaction). For balanced designs
    types I, II and III agree, and the interaction row is the same under II and III in any case.
    """
    y = np.asarray(values, dtype=np.float64)
    _check_lengths(y, factor_a, factor_b)
    frame = pd.DataFrame({"y": y, "a": [str(v) for v in factor_a], "b": [str(v) for v in factor_b]})
    if frame["a"].nunique() < 2 or frame["b"].nunique() < 2:
        raise ValueError("Expected at least two levels of each factor")
    fit = smf.ols("y ~ C(a, Sum) * C(b, Sum)", data=frame).fit()
    table = anova_lm(fit, typ=3)
    ss_error = float(table.loc["Residual", "sum_sq"])
    df_error = float(table.loc["Residual", "df"])
    if df_error <= 0:
        raise ValueError("No replicates left for the error term; need more than one value in some cell")
    effects = {}
    for name, term in _TERMS.items():
        ss = float(table.loc[term, "sum_sq"])
        effects[name] = EffectStats(
            ss=ss,
            df=float(table.loc[term, "df"]),
            f=float(table.loc[term, "F"]),
            p=float(table.loc[term, "PR(>F)"]),
            partial_eta_sq=ss / (ss + ss_error) if ss + ss_error > 0 else 0.0,
        )
    return AnovaResult(effects=effects, ss_error=ss_error, df_error=df_error)


def bonferroni(p_values: Sequence[float], n_tests: int | None = None) -> list[float]:
    """``min(1, p * m)`` for each p, with ``m = n_tests`` or the number of p-values."""
    m = len(p_values) if n_tests is None else n_tests
    if m < len(p_values):
        raise ValueError(f"n_tests={m} is smaller than the {len(p_values)} p-values given")
    return [min(1.0, float(p) * m) for p in p_values]


def _main_effect(values: np.ndarray, on: np.ndarray) -> float:
    if on.all() or not on.any():
        raise ValueError("Expected observations with the component both on and off")
    return float(values[on].mean() - values[~on].mean())


def interaction_table(
    results: Mapping[str, tuple[Sequence[float], Sequence[bool], Sequence[bool]]],
    alpha: float = ALPHA,
) -> list[InteractionRow]:
    """Frozen-base x component interaction per component (outline 3.3), Bonferroni over the components.

    ``results[component] = (values (N,), frozen_flags (N,), component_on_flags (N,))``: one metric value per
    run with the base frozen or not and the component on or off. Rows come back in the input order.
    """
    rows = []
    for component, (values, frozen, on) in results.items():
        y = np.asarray(values, dtype=np.float64)
        on_mask = np.asarray(on, dtype=bool)
        inter = two_way_anova(y, list(np.asarray(frozen, dtype=bool)), list(on_mask)).interaction
        rows.append((component, _main_effect(y, on_mask), inter))
    corrected = bonferroni([inter.p for _, _, inter in rows])
    return [
        InteractionRow(
            component=component,
            main_effect=effect,
            f=inter.f,
            p_raw=inter.p,
            p_bonferroni=p_corr,
            partial_eta_sq=inter.partial_eta_sq,
            category="core" if p_corr < alpha else "general",
        )
        for (component, effect, inter), p_corr in zip(rows, corrected, strict=True)
    ]


def svd_spectrum(delta_w: np.ndarray) -> np.ndarray:
    """Singular values of ``delta_w (m, n)`` divided by the largest, descending, shape ``(min(m, n),)``.

    A zero matrix gives all zeros.
    """
    s = np.linalg.svd(np.asarray(delta_w, dtype=np.float64), compute_uv=False)
    return s / s[0] if s.size and s[0] > 0 else np.zeros_like(s)


def effective_rank(delta_w: np.ndarray, energy: float = 0.9) -> int:
    """Smallest k whose top-k squared singular values hold at least ``energy`` of the total (outline 3.4.1.1).

    ``delta_w (m, n)``, ``energy`` in (0, 1]. A zero matrix has rank 0. A relative tolerance of 1e-12 keeps
    round-off from pushing k up when the energy is reached exactly.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    s2 = np.linalg.svd(np.asarray(delta_w, dtype=np.float64), compute_uv=False) ** 2
    total = s2.sum()
    if total == 0:
        return 0
    cumulative = np.cumsum(s2) / total
    return int(np.searchsorted(cumulative, energy - 1e-12) + 1)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); the std of a single value is NaN."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("Expected at least one value")
    std = float(x.std(ddof=1)) if x.size > 1 else math.nan
    return float(x.mean()), std


def summarize_over_seeds(per_seed: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """``[{metric: value}, ...]`` (one dict per seed) -> ``{metric: (mean, std)}``; every seed needs the same keys."""
    if not per_seed:
        raise ValueError("Expected results from at least one seed")
    keys = list(per_seed[0])
    for i, result in enumerate(per_seed):
        if set(result) != set(keys):
            raise ValueError(f"Seed {i} has metrics {sorted(result)}, expected {sorted(keys)}")
    return {key: mean_std([result[key] for result in per_seed]) for key in keys}
