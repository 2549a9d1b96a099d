"""LoRA sufficiency (outline 3.4.1.1): how low-rank is the weight change of an unfrozen base?

Train the first task with the base, then keep training the base on the next tasks
(``train.base_policy=always_trainable``). For every :class:`~moleflow.flow.lora.LoRALinear` of the flow,
``delta_W_k = W_base(after task k) - W_base(after task 0)`` of shape ``(out, in)`` is what a full
fine-tuning needed for tasks 1..k. If its effective rank (90 % / 99 % of the squared singular values)
stays below the LoRA rank ``r``, a rank-``r`` adapter could have expressed it; the share of the energy a
rank-``r`` truncation keeps, and ``sigma_{r+1} / sigma_1`` (the outline's bound), say how much it misses.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moleflow.analysis.outputs import markdown_table, write_analysis
from moleflow.analysis.stats import effective_rank
from moleflow.config import MoleFlowConfig, replace
from moleflow.data.base import TaskData
from moleflow.features.cache import CachedFeatures
from moleflow.flow.lora import LoRALinear
from moleflow.flow.model import MoLEFlow
from moleflow.training import ContinualTrainer
from moleflow.visualize import new_figure, save_figure

log = logging.getLogger(__name__)
ENERGIES = (0.9, 0.99)


def base_weights(model: MoLEFlow) -> dict[str, torch.Tensor]:
    """The shared weight ``W (out, in)`` of every LoRALinear, keyed by module name (float64 CPU copies)."""
    return {
        name: module.base.weight.detach().to("cpu", torch.float64).clone()
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear)
    }


def weight_deltas(reference: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``current[name] - reference[name]`` per layer, both from :func:`base_weights` of the same model."""
    if set(reference) != set(current):
        raise ValueError(f"snapshots hold different layers: {sorted(set(reference) ^ set(current))[:5]}")
    for name in reference:
        if reference[name].shape != current[name].shape:
            raise ValueError(f"layer {name}: shape {tuple(reference[name].shape)} vs {tuple(current[name].shape)}")
    return {name: (current[name] - reference[name]).numpy() for name in reference}


def cumulative_energy(delta_w: np.ndarray) -> np.ndarray:
    """Share of ``||delta_w||_F^2`` held by the top-k singular values, k = 1..min(m, n); zeros -> ones."""
    s2 = np.linalg.svd(np.asarray(delta_w, dtype=np.float64), compute_uv=False) ** 2
    total = s2.sum()
    return np.cumsum(s2) / total if total > 0 else np.ones_like(s2)


@dataclass(frozen=True)
class LayerRank:
    """Rank statistics of one layer's ``delta_W (out, in)``."""

    layer: str  # module name, e.g. "flow.blocks.3.subnet.layer1"
    layer_type: str  # last name component, e.g. "layer1" (input projection) or "layer2" (output)
    shape: tuple[int, int]
    delta_norm: float  # ||delta_W||_F
    relative_change: float  # ||delta_W||_F / ||W_0||_F
    rank_90: int
    rank_99: int
    energy_at_lora_rank: float  # share of ||delta_W||_F^2 in the top-r singular values
    sigma_after_rank: float | None  # sigma_{r+1} / sigma_1 (None when r >= min(m, n) or delta_W = 0)
    energy_curve: list[float]  # cumulative_energy(delta_W)


def layer_rank(name: str, delta_w: np.ndarray, reference: np.ndarray, lora_rank: int) -> LayerRank:
    s = np.linalg.svd(np.asarray(delta_w, dtype=np.float64), compute_uv=False)
    curve = cumulative_energy(delta_w)
    ref_norm = float(np.linalg.norm(reference))
    sigma_after = float(s[lora_rank] / s[0]) if lora_rank < s.size and s[0] > 0 else None
    return LayerRank(
        layer=name,
        layer_type=name.rsplit(".", 1)[-1],
        shape=tuple(delta_w.shape),
        delta_norm=float(np.linalg.norm(delta_w)),
        relative_change=float(np.linalg.norm(delta_w)) / ref_norm if ref_norm > 0 else 0.0,
        rank_90=effective_rank(delta_w, ENERGIES[0]),
        rank_99=effective_rank(delta_w, ENERGIES[1]),
        energy_at_lora_rank=float(curve[min(lora_rank, curve.size) - 1]),
        sigma_after_rank=sigma_after,
        energy_curve=curve.tolist(),
    )


def summarize(rows: list[LayerRank], lora_rank: int) -> dict[str, Any]:
    """Median / max effective ranks and the worst share kept by rank r, over all layers and per layer type."""

    def block(subset: list[LayerRank]) -> dict[str, Any]:
        r90, r99 = [r.rank_90 for r in subset], [r.rank_99 for r in subset]
        kept = [r.energy_at_lora_rank for r in subset]
        return {
            "layers": len(subset),
            "rank_90_median": float(np.median(r90)),
            "rank_90_max": int(max(r90)),
            "rank_99_median": float(np.median(r99)),
            "rank_99_max": int(max(r99)),
            "energy_at_lora_rank_median": float(np.median(kept)),
            "energy_at_lora_rank_min": float(min(kept)),
            "fraction_rank_99_within_lora_rank": float(np.mean([r <= lora_rank for r in r99])),
            "full_rank": int(min(min(r.shape) for r in subset)),
        }

    types = sorted({r.layer_type for r in rows})
    return {"all": block(rows), "by_type": {t: block([r for r in rows if r.layer_type == t]) for t in types}}


def learn_with_snapshots(
    trainer: ContinualTrainer, task_features: list[tuple[str, CachedFeatures]], progress: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Learn the tasks in order with the trainer's config as given; :func:`base_weights` after each task."""
    snapshots = []
    for name, feats in task_features:
        trainer.learn_task(name, feats.to(trainer.device), progress=progress)
        snapshots.append(base_weights(trainer.model))
    return snapshots


def analyse_snapshots(snapshots: list[dict[str, torch.Tensor]], task_names: list[str], lora_rank: int) -> dict[str, Any]:
    """Rank rows and summaries of ``snapshot[k] - snapshot[0]`` for k = 1..T-1."""
    if len(snapshots) < 2 or len(snapshots) != len(task_names):
        raise ValueError(f"need one snapshot per task and at least 2 tasks, got {len(snapshots)} for {task_names}")
    steps = []
    for k in range(1, len(snapshots)):
        deltas = weight_deltas(snapshots[0], snapshots[k])
        rows = [layer_rank(n, d, snapshots[0][n].numpy(), lora_rank) for n, d in deltas.items()]
        steps.append(
            {
                "after_task": task_names[k],
                "tasks_since_first": k,
                "summary": summarize(rows, lora_rank),
                "layers": [dataclasses.asdict(r) for r in rows],
            }
        )
    return {"lora_rank": lora_rank, "tasks": task_names, "steps": steps}


def run_lora_analysis(
    cfg: MoleFlowConfig, tasks: list[TaskData], out: Path, feature_cache: Path | None = None, progress: bool = False
) -> dict[str, Any]:
    """Train an unfrozen run on ``tasks`` and write ``lora_rank.{json,md}`` and the energy figure into ``out``."""
    if len(tasks) < 2:
        raise ValueError("the LoRA rank analysis needs at least 2 tasks (the base changes only after the first)")
    if cfg.train.base_policy != "always_trainable":
        log.info("training the base on every task (train.base_policy=always_trainable) for this analysis")
        cfg = replace(cfg, train=replace(cfg.train, base_policy="always_trainable"))
    from moleflow.experiment import ContinualExperiment

    exp = ContinualExperiment(cfg, out, progress=progress, feature_cache=feature_cache)
    features = [(t.name, exp.extract(t.train, f"features {t.name}/train")) for t in tasks]
    snapshots = learn_with_snapshots(exp.trainer, features, progress)
    result = analyse_snapshots(snapshots, [t.name for t in tasks], cfg.model.flow.lora.rank)
    result["config"] = {"preset": cfg.preset, "epochs": cfg.train.epochs, "subnet": cfg.model.flow.subnet}
    write_lora_outputs(result, out)
    return result


def lora_markdown(result: dict[str, Any]) -> str:
    r = result["lora_rank"]
    head = [
        "after task",
        "layers",
        "rank90 median",
        "rank90 max",
        "rank99 median",
        "rank99 max",
        f"energy kept at r={r} (median)",
        f"energy kept at r={r} (min)",
    ]
    rows = []
    for step in result["steps"]:
        s = step["summary"]["all"]
        rows.append(
            [
                step["after_task"],
                s["layers"],
                s["rank_90_median"],
                s["rank_90_max"],
                s["rank_99_median"],
                s["rank_99_max"],
                s["energy_at_lora_rank_median"],
                s["energy_at_lora_rank_min"],
            ]
        )
    last = result["steps"][-1]
    by_type = [
        [
            t,
            s["layers"],
            s["full_rank"],
            s["rank_90_median"],
            s["rank_99_median"],
            s["rank_99_max"],
            s["energy_at_lora_rank_min"],
        ]
        for t, s in last["summary"]["by_type"].items()
    ]
    layers = [
        [
            x["layer"],
            "x".join(map(str, x["shape"])),
            x["relative_change"],
            x["rank_90"],
            x["rank_99"],
            x["energy_at_lora_rank"],
            x["sigma_after_rank"],
        ]
        for x in last["layers"]
    ]
    return (
        "\n\n".join(
            [
                f"# LoRA sufficiency: effective rank of the unfrozen base's weight change (LoRA rank r = {r})",
                "delta_W = W_base(after task k) - W_base(after the first task). Summary over all LoRALinear layers:",
                markdown_table(head, rows),
                f"By layer type, after {last['after_task']!r}:",
                markdown_table(
                    [
                        "layer type",
                        "layers",
                        "full rank",
                        "rank90 median",
                        "rank99 median",
                        "rank99 max",
                        "energy at r (min)",
                    ],
                    by_type,
                ),
                f"Per layer, after {last['after_task']!r}:",
                markdown_table(
                    ["layer", "shape", "norm(dW)/norm(W0)", "rank90", "rank99", "energy at r", "sigma_r+1/sigma_1"],
                    layers,
                    4,
                ),
            ]
        )
        + "\n"
    )


def energy_figure(result: dict[str, Any], path: Path) -> Path:
    """Cumulative singular-value energy per layer (last step), LoRA rank and the 90/99 % levels marked."""
    last, r = result["steps"][-1], result["lora_rank"]
    fig = new_figure(10, 4)
    ax_energy, ax_sigma = fig.subplots(1, 2)
    types = sorted({x["layer_type"] for x in last["layers"]})
    colours = {t: f"C{i}" for i, t in enumerate(types)}
    for x in last["layers"]:
        curve = np.asarray(x["energy_curve"])
        k = np.arange(1, curve.size + 1)
        ax_energy.plot(k, curve, color=colours[x["layer_type"]], lw=0.8, alpha=0.7)
        sigma = np.sqrt(np.diff(np.concatenate([[0.0], curve])).clip(min=0))
        if sigma[0] > 0:
            ax_sigma.semilogy(k, sigma / sigma[0], color=colours[x["layer_type"]], lw=0.8, alpha=0.7)
    for ax in (ax_energy, ax_sigma):
        ax.axvline(r, color="k", ls="--", lw=1, label=f"LoRA rank r={r}")
        ax.set_xlabel("rank k")
    for level in ENERGIES:
        ax_energy.axhline(level, color="grey", ls=":", lw=1)
    for t in types:
        ax_energy.plot([], [], color=colours[t], label=t)
    ax_energy.set_ylabel("energy kept by top-k singular values")
    ax_energy.legend(fontsize=7, loc="lower right")
    ax_sigma.axhline(0.01, color="grey", ls=":", lw=1)
    ax_sigma.set_ylabel("sigma_k / sigma_1")
    fig.suptitle(f"SVD of the unfrozen base's weight change after {last['after_task']!r} (one line per layer)", fontsize=9)
    return save_figure(fig, path)


def write_lora_outputs(result: dict[str, Any], out: Path) -> None:
    write_analysis(
        out, "lora_rank", result, lora_markdown(result), lambda p: energy_figure(result, p), "lora_rank_energy.png"
    )
