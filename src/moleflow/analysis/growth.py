"""Parameter and memory growth with the number of tasks: measured against the closed form.

Tasks are added without training (``model.add_task``): their tensors have their final sizes at once, so
counts, checkpoint bytes and memory are those of a trained model. The closed form, from the config alone::

    params(T) = base + T * per_task
    per_task  = sum over LoRALinear (in -> out) of r (in + out) + out   (A, B, task bias)
              + 2 D                                                     (whitening gamma, beta)
              + blocks * (D/2 h + h + h D + D),  h = round(ratio D)    (DIA)
              + 1 if the mixer gate is per task
    router(T) = T * (G + G^2) float64   (a mean and a precision matrix per task)
"""

from __future__ import annotations

import logging
import os
import resource
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moleflow.analysis.outputs import markdown_table, write_analysis
from moleflow.checkpoint import save_base, save_router, save_task, task_file
from moleflow.config import FlowConfig, LoRAConfig, ModelConfig, MoleFlowConfig, replace
from moleflow.flow.model import MoLEFlow
from moleflow.routing import Router
from moleflow.training import router_dim
from moleflow.visualize import new_figure, save_figure

log = logging.getLogger(__name__)
BYTES_PER_PARAM = 4  # float32 model
BYTES_PER_ROUTER_FLOAT = 8  # float64 prototypes


def _lora_linear(n_in: int, n_out: int, lora: LoRAConfig) -> tuple[int, int]:
    """(base, per-task) parameters of one LoRALinear ``n_in -> n_out``."""
    return n_in * n_out + n_out, lora.rank * (n_in + n_out) + (n_out if lora.task_bias else 0)


def _subnet(n_in: int, n_out: int, flow: FlowConfig) -> tuple[int, int]:
    """(base, per-task) parameters of one coupling subnet ``n_in -> n_out`` (see flow/subnets.py)."""
    hidden = max(1, round(flow.hidden_ratio * n_in))
    if flow.subnet == "mlp":
        layers = [(n_in, hidden), (hidden, n_out)]
        extra = 0
    elif flow.subnet == "context":
        half = n_out // 2
        layers = [(2 * n_in, hidden), (hidden, half), (n_in, hidden), (hidden, half)]
        extra = n_in * flow.context_kernel**2 + 1  # depthwise context conv (no bias) + its gate
    else:
        raise ValueError(f"unknown subnet {flow.subnet!r}")
    parts = [_lora_linear(i, o, flow.lora) for i, o in layers]
    return extra + sum(b for b, _ in parts), sum(t for _, t in parts)


def closed_form_counts(model_cfg: ModelConfig, context_dim: int | None = None) -> dict[str, int]:
    """``{"base": n, "per_task": n, "lora": ..., "whitening": ..., "dia": ..., "mixer": ...}`` from the config."""
    d = model_cfg.backbone.embed_dim
    passive, active = d - d // 2, d // 2
    sub_base, sub_task = _subnet(passive, 2 * active, model_cfg.flow)
    layers = model_cfg.flow.coupling_layers
    base = layers * (sub_base + 2 * d)  # + global scale and offset per coupling
    mixer_task = 0
    if model_cfg.spatial_mixer is not None:
        per_task_gate = model_cfg.spatial_mixer.gate == "per_task"
        base += d * model_cfg.spatial_mixer.kernel_size**2 + (0 if per_task_gate else 1)
        mixer_task = 1 if per_task_gate else 0
    if model_cfg.scale_context is not None:
        if not context_dim:
            raise ValueError("the scale context's size depends on the backbone: pass context_dim")
        base += context_dim * d + d + d * model_cfg.scale_context.kernel_size**2 + d
    whitening = 2 * d if model_cfg.whitening is not None else 0
    dia = 0
    if model_cfg.dia is not None:
        hidden = max(1, round(model_cfg.dia.hidden_ratio * d))
        half = d // 2
        dia = model_cfg.dia.blocks * (half * hidden + hidden + hidden * 2 * half + 2 * half)
    lora = layers * sub_task
    return {
        "base": base,
        "per_task": lora + whitening + dia + mixer_task,
        "lora": lora,
        "whitening": whitening,
        "dia": dia,
        "mixer": mixer_task,
    }


def backbone_dims(cfg: MoleFlowConfig) -> tuple[int | None, int]:
    """``(context_dim or None, router feature width G)``; builds the backbone (no weights) only if needed."""
    needs_context = cfg.model.scale_context is not None
    if not needs_context and cfg.router.feature != "backbone_pooled":
        return None, router_dim(cfg, 0)
    from moleflow.features.extractor import FeatureExtractor

    extractor = FeatureExtractor(replace(cfg.model.backbone, pretrained=False))
    return (extractor.context_dim if needs_context else None), router_dim(cfg, extractor.pooled_dim)


def resident_bytes() -> int:
    """Current resident set size of this process (Linux /proc; the peak from getrusage elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_points(max_tasks: int) -> list[int]:
    """1..5, then 10, 20, ... up to ``max_tasks`` (always included)."""
    if max_tasks < 1:
        raise ValueError(f"--max-tasks must be >= 1, got {max_tasks}")
    points = sorted({t for t in (1, 2, 3, 4, 5) if t <= max_tasks} | set(range(10, max_tasks + 1, 10)) | {max_tasks})
    return points


def measure_growth(cfg: MoleFlowConfig, max_tasks: int, workdir: Path) -> dict[str, Any]:
    """Add tasks 1..max_tasks to a fresh model and router; measure at :func:`measure_points`."""
    context_dim, router_dim = backbone_dims(cfg)
    torch.manual_seed(0)
    rss_start = resident_bytes()
    model = MoLEFlow(cfg.model, context_dim)
    router = Router(cfg.router)
    points, rows = set(measure_points(max_tasks)), []
    task_bytes = 0
    for t in range(1, max_tasks + 1):
        name = f"task{t:03d}"
        model.add_task(name)
        router.add(name, torch.zeros(router_dim), torch.eye(router_dim))
        save_task(model, router, cfg, name, task_file(workdir / "checkpoints", name), "growth", name)
        task_bytes += (workdir / "checkpoints" / "tasks" / f"{name}.safetensors").stat().st_size
        if t == 1:
            save_base(model, cfg, workdir / "checkpoints", base_id="growth")
        if t not in points:
            continue
        save_router(router, cfg, workdir / "checkpoints", "growth", router.tasks)
        counts = model.parameter_counts()
        rows.append(
            {
                "tasks": t,
                "base_params": counts["base"],
                "task_params": sum(counts["per_task"].values()),
                "total_params": counts["base"] + sum(counts["per_task"].values()),
                "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "base_file_bytes": (workdir / "checkpoints" / "base.safetensors").stat().st_size,
                "task_file_bytes": task_bytes,
                "router_floats": router.means.numel() + router.precisions.numel(),
                "router_file_bytes": (workdir / "checkpoints" / "router.safetensors").stat().st_size,
                "rss_growth_bytes": resident_bytes() - rss_start,
            }
        )
        log.info("growth %s: %d tasks, %d parameters", cfg.preset, t, rows[-1]["total_params"])
    return {"context_dim": context_dim, "router_dim": router_dim, "rows": rows}


def compare_with_formula(cfg: MoleFlowConfig, measured: dict[str, Any]) -> dict[str, Any]:
    """Closed-form predictions next to each measured row, and whether they agree exactly."""
    form = closed_form_counts(cfg.model, measured["context_dim"])
    g = measured["router_dim"]
    for row in measured["rows"]:
        t = row["tasks"]
        row["formula_params"] = form["base"] + t * form["per_task"]
        row["formula_router_floats"] = t * (g + g * g)
        row["formula_bytes"] = (
            BYTES_PER_PARAM * row["formula_params"] + BYTES_PER_ROUTER_FLOAT * row["formula_router_floats"]
        )
    rows = measured["rows"]
    tasks = np.array([r["tasks"] for r in rows], dtype=np.float64)
    slope = float(np.polyfit(tasks, [r["task_file_bytes"] for r in rows], 1)[0]) if len(rows) > 1 else None
    return {
        "formula": form,
        "params_match": all(r["formula_params"] == r["total_params"] for r in rows),
        "router_match": all(r["formula_router_floats"] == r["router_floats"] for r in rows),
        "task_file_bytes_per_task": None if slope is None else round(slope),
        "task_file_overhead_bytes": None if slope is None else round(slope) - BYTES_PER_PARAM * form["per_task"],
    }


def run_growth_analysis(cfg: MoleFlowConfig, max_tasks: int, out: Path) -> dict[str, Any]:
    """Measure, compare and write ``growth_<preset>.{json,md,png}`` into ``out``."""
    with tempfile.TemporaryDirectory(prefix="moleflow-growth-") as tmp:
        measured = measure_growth(cfg, max_tasks, Path(tmp))
    result = {"preset": cfg.preset, "max_tasks": max_tasks, **measured, **compare_with_formula(cfg, measured)}
    stem = f"growth_{cfg.preset}"
    write_analysis(out, stem, result, growth_markdown(result), lambda p: growth_figure(result, p), f"{stem}.png")
    return result


def growth_markdown(result: dict[str, Any]) -> str:
    f = result["formula"]
    mb = 1 / 2**20
    head = ["T", "params", "formula", "param MB", "task files MB", "router floats", "formula", "router MB", "RSS growth MB"]
    rows = [
        [
            r["tasks"],
            r["total_params"],
            r["formula_params"],
            r["parameter_bytes"] * mb,
            r["task_file_bytes"] * mb,
            r["router_floats"],
            r["formula_router_floats"],
            r["router_file_bytes"] * mb,
            r["rss_growth_bytes"] * mb,
        ]
        for r in result["rows"]
    ]
    g = result["router_dim"]
    return (
        "\n\n".join(
            [
                f"# Growth with the number of tasks: preset {result['preset']!r}",
                f"Closed form: params(T) = {f['base']:,} + T * {f['per_task']:,} (per task: LoRA {f['lora']:,}, "
                f"whitening {f['whitening']:,}, DIA {f['dia']:,}, mixer gate {f['mixer']}); "
                f"router(T) = T * (G + G^2) float64 with G = {g}, i.e. {g + g * g:,} floats per task.",
                f"Formula equals the counted parameters at every T: {result['params_match']}; "
                f"router floats: {result['router_match']}. Task checkpoint file bytes per task (fit): "
                f"{result['task_file_bytes_per_task']}, of which safetensors header/metadata: "
                f"{result['task_file_overhead_bytes']}.",
                markdown_table(head, rows, 2),
            ]
        )
        + "\n"
    )


def growth_figure(result: dict[str, Any], path: Path) -> Path:
    rows = result["rows"]
    t = np.array([r["tasks"] for r in rows])
    mb = 1 / 2**20
    fig = new_figure(10, 3.6)
    ax_p, ax_m = fig.subplots(1, 2)
    ax_p.plot(t, [r["total_params"] / 1e6 for r in rows], "o", label="counted")
    ax_p.plot(t, [r["formula_params"] / 1e6 for r in rows], "-", label="base + T * per_task")
    ax_p.set_xlabel("tasks T")
    ax_p.set_ylabel("parameters (millions)")
    ax_p.legend(fontsize=7)
    for key, label in (
        ("parameter_bytes", "float32 parameters"),
        ("task_file_bytes", "task checkpoint files"),
        ("router_file_bytes", "router checkpoint"),
        ("rss_growth_bytes", "process RSS growth"),
    ):
        ax_m.plot(t, [r[key] * mb for r in rows], "o-", ms=3, label=label)
    ax_m.plot(t, [r["formula_bytes"] * mb for r in rows], "k--", lw=1, label="formula: params + router")
    ax_m.set_xlabel("tasks T")
    ax_m.set_ylabel("MiB")
    ax_m.legend(fontsize=7)
    fig.suptitle(f"Growth with the number of tasks, preset {result['preset']!r}", fontsize=9)
    return save_figure(fig, path)
