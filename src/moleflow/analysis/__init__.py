"""Statistics behind the paper's analyses: ANOVA of components (outline 3.3), LoRA rank (3.4.1.1), DIA effect (3.4.3.1)."""

from moleflow.analysis.latents import decompose_transform, latent_statistics, pca_2d
from moleflow.analysis.stats import (
    AnovaResult,
    EffectStats,
    InteractionRow,
    bonferroni,
    effective_rank,
    interaction_table,
    mean_std,
    summarize_over_seeds,
    svd_spectrum,
    two_way_anova,
)

__all__ = [
    "AnovaResult",
    "EffectStats",
    "InteractionRow",
    "bonferroni",
    "decompose_transform",
    "effective_rank",
    "interaction_table",
    "latent_statistics",
    "mean_std",
    "pca_2d",
    "summarize_over_seeds",
    "svd_spectrum",
    "two_way_anova",
]
