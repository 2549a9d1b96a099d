"""DIA effect (outline 3.4.3.1): latents before (``z_base``) and after (``z``) each task's DIA.

For every task of a trained run, its own adapter (task id given, as the oracle) maps the task's normal
patches to ``z_base`` and ``z``, both ``(N_patches, D)``. Reported per task: the Gaussianity summary
(mean norm, per-dimension std, kurtosis, |skewness|; N(0, I) gives 0, 1, 3, 0), and the split of
``z - z_base`` into a per-dimension scale, a shift and a nonlinear residual
(:func:`moleflow.analysis.latents.decompose_transform`). A figure projects both onto the top two principal
axes of ``z_base`` (normal patches, and anomalous ones where the task has masks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from moleflow.analysis.latents import decompose_transform, latent_statistics, pca_2d
from moleflow.analysis.outputs import markdown_table, write_analysis
from moleflow.features.cache import CachedFeatures
from moleflow.flow.model import MoLEFlow
from moleflow.visualize import new_figure, save_figure

log = logging.getLogger(__name__)
STATS = ("mean_norm", "mean_std", "mean_kurtosis", "mean_abs_skew")
MASK_COVERAGE = 0.5  # a patch counts as anomalous when at least this share of its pixels is in the mask
PLOT_POINTS = (3000, 1000)  # at most this many normal / anomalous patches per scatter (fixed subsample)


@dataclass
class TaskLatents:
    """One task's latents, flattened over images and grid: ``(N, D)`` arrays."""

    task: str
    before: np.ndarray  # z_base of normal patches
    after: np.ndarray  # z of the same patches
    anomalous_before: np.ndarray | None  # patches inside defect masks (None: no masks / train split)
    anomalous_after: np.ndarray | None


@torch.no_grad()
def latents(model: MoLEFlow, feats: CachedFeatures, task: str, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_base, z)``, each ``(B, H, W, D)``, of ``feats`` through ``task``'s adapters (CPU float32)."""
    if model.cfg.dia is None:
        raise ValueError("this run has no DIA (model.dia is null): there is nothing to analyse")
    device = next(model.parameters()).device
    before, after = [], []
    for start in range(0, len(feats), batch_size):
        chunk = feats[start : start + batch_size].to(device)
        out = model(chunk.patches, task, chunk.context)
        before.append(out.z_base.float().cpu())
        after.append(out.z.float().cpu())
    return torch.cat(before), torch.cat(after)


def patch_mask(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Pixel masks ``(N, S, S)`` -> patch labels ``(N, H, W)`` bool: mask coverage of the cell >= MASK_COVERAGE."""
    coverage = F.adaptive_avg_pool2d(torch.as_tensor(masks, dtype=torch.float32)[:, None], grid)[:, 0]
    return (coverage >= MASK_COVERAGE).numpy()


def split_patches(
    task: str, z_base: torch.Tensor, z: torch.Tensor, labels: np.ndarray, masks: np.ndarray | None
) -> TaskLatents:
    """Normal patches = every patch of a normal image; anomalous = masked patches of anomalous images."""
    d = z.shape[-1]
    normal = labels == 0
    if not normal.any():
        raise ValueError(f"task {task!r} has no normal images in this split")
    anomalous_b = anomalous_a = None
    if masks is not None and (labels == 1).any():
        inside = patch_mask(masks, tuple(z.shape[1:3])) & (labels == 1)[:, None, None]
        if inside.any():
            anomalous_b, anomalous_a = z_base.numpy()[inside], z.numpy()[inside]
    return TaskLatents(
        task, z_base[normal].reshape(-1, d).numpy(), z[normal].reshape(-1, d).numpy(), anomalous_b, anomalous_a
    )


def task_effect(lat: TaskLatents) -> dict[str, Any]:
    """Statistics before/after and the scale/shift/residual split for one task's normal patches."""
    parts = decompose_transform(lat.before, lat.after)
    return {
        "task": lat.task,
        "patches": int(lat.before.shape[0]),
        "anomalous_patches": 0 if lat.anomalous_before is None else int(lat.anomalous_before.shape[0]),
        "before": latent_statistics(lat.before),
        "after": latent_statistics(lat.after),
        "decomposition": {
            "scale_share": parts["scale_share"],
            "shift_share": parts["shift_share"],
            "residual_share": parts["residual_share"],
            "delta_norm_per_patch": parts["delta_norm"] / np.sqrt(lat.before.shape[0]),
            "scale_deviation_norm": float(np.linalg.norm(parts["s"] - 1.0)),  # ||S_t - 1||_2
            "shift_norm": float(np.linalg.norm(parts["m"])),  # ||mu_t||_2 of the fitted offset
        },
    }


def summarize_effects(per_task: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over tasks of every statistic before/after, and the relative change of the means."""
    out: dict[str, Any] = {}
    for stat in STATS:
        b = np.array([t["before"][stat] for t in per_task])
        a = np.array([t["after"][stat] for t in per_task])
        change = (a.mean() - b.mean()) / abs(b.mean()) if b.mean() != 0 else None
        out[stat] = {
            "before_mean": b.mean(),
            "before_std": b.std(ddof=1) if b.size > 1 else None,
            "after_mean": a.mean(),
            "after_std": a.std(ddof=1) if a.size > 1 else None,
            "relative_change": change,
        }
    for share in ("scale_share", "shift_share", "residual_share"):
        out[share] = float(np.mean([t["decomposition"][share] for t in per_task]))
    return out


def dia_markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    stat_rows = [
        [k, v["before_mean"], v["before_std"], v["after_mean"], v["after_std"], _percent(v["relative_change"])]
        for k, v in s.items()
        if k in STATS
    ]
    task_rows = [
        [t["task"], t["patches"]]
        + [t[side][k] for k in STATS for side in ("before", "after")]
        + [t["decomposition"][k] for k in ("scale_share", "shift_share", "residual_share")]
        for t in result["tasks"]
    ]
    stat_head = [f"{k} {side}" for k in ("norm(mu)", "std", "kurt", "abs(skew)") for side in ("before", "after")]
    return (
        "\n\n".join(
            [
                f"# DIA effect on {result['split']} normal patches (N(0, I): |mu| 0, std 1, kurtosis 3, |skew| 0)",
                f"Over {len(result['tasks'])} tasks (mean, std over tasks):",
                markdown_table(["statistic", "before mean", "before std", "after mean", "after std", "change %"], stat_rows),
                "Split of z - z_base into per-dimension scale, shift and nonlinear residual (share of the squared norm), "
                f"mean over tasks: scale {s['scale_share']:.3f}, shift {s['shift_share']:.3f}, "
                f"residual {s['residual_share']:.3f}.",
                "Per task:",
                markdown_table(["task", "patches", *stat_head, "scale", "shift", "residual"], task_rows),
            ]
        )
        + "\n"
    )


def _percent(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _subsample(x: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    if x.shape[0] <= limit:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(x.shape[0], limit, replace=False))]


def pca_figure(all_latents: list[TaskLatents], path: Path) -> Path:
    """Rows = tasks, columns = before / after DIA, on the PCA plane of each task's normal ``z_base``."""
    fig = new_figure(7, 3.2 * len(all_latents))
    fig.set_layout_engine("constrained")
    # shared limits per row: the DIA's shift and stretch show as a moved / resized cloud
    axes = fig.subplots(len(all_latents), 2, squeeze=False, sharex="row", sharey="row")
    for row, lat in zip(axes, all_latents, strict=True):
        normal_b, normal_a = (_subsample(x, PLOT_POINTS[0]) for x in (lat.before, lat.after))
        for ax, normal, anomalous, title in (
            (row[0], normal_b, lat.anomalous_before, "before DIA (z_base)"),
            (row[1], normal_a, lat.anomalous_after, "after DIA (z)"),
        ):
            coords, _ = pca_2d(normal, basis_from=lat.before)
            ax.scatter(coords[:, 0], coords[:, 1], s=2, alpha=0.3, color="C0", label="normal", rasterized=True)
            if anomalous is not None and anomalous.shape[0] >= 2:
                ac, _ = pca_2d(_subsample(anomalous, PLOT_POINTS[1]), basis_from=lat.before)
                ax.scatter(ac[:, 0], ac[:, 1], s=4, alpha=0.6, color="C3", label="anomalous (mask)", rasterized=True)
            ax.set_title(f"{lat.task}: {title}", fontsize=8)
            ax.set_xlabel("PC1 of z_base", fontsize=7)
            ax.set_ylabel("PC2 of z_base", fontsize=7)
            ax.tick_params(labelsize=6)
        row[0].legend(fontsize=6, markerscale=3)
    return save_figure(fig, path)


def analyse_run(
    model: MoLEFlow, task_sets: list[tuple[str, CachedFeatures, np.ndarray, np.ndarray | None]], split: str
) -> tuple[dict[str, Any], list[TaskLatents]]:
    """``task_sets``: ``(task, features, labels (N,), masks (N, S, S) | None)`` per task, in learning order."""
    all_latents = []
    for task, feats, labels, masks in task_sets:
        z_base, z = latents(model, feats, task)
        all_latents.append(split_patches(task, z_base, z, labels, masks))
        log.info("DIA latents of %r: %d normal patches", task, all_latents[-1].before.shape[0])
    per_task = [task_effect(lat) for lat in all_latents]
    return {"split": split, "tasks": per_task, "summary": summarize_effects(per_task)}, all_latents


def run_dia_analysis(
    run_dir: Path, out: Path, split: Literal["test", "train"] = "test", feature_cache: Path | None = None, data_root=None
) -> dict[str, Any]:
    """Load ``run_dir``, rebuild its tasks, and write ``dia_effect.{json,md}`` and ``dia_pca.png`` into ``out``."""
    from moleflow.analysis.run_loading import load_run

    loaded = load_run(run_dir, feature_cache=feature_cache, data_root=data_root)
    task_sets = []
    for task in loaded.tasks:
        if split == "test":
            es = loaded.experiment.prepare_eval_set(task)
            task_sets.append((task.name, es.features, es.labels, es.masks))
        else:
            feats = loaded.experiment.extract(task.train, f"features {task.name}/train")
            task_sets.append((task.name, feats, np.zeros(len(feats), dtype=np.int64), None))
    result, all_latents = analyse_run(loaded.experiment.model, task_sets, split)
    result["run_dir"] = str(Path(run_dir).resolve())
    write_analysis(out, "dia_effect", result, dia_markdown(result), lambda p: pca_figure(all_latents, p), "dia_pca.png")
    return result
