"""Human-readable run report: ``RUN_DIR/report.md`` plus ``RUN_DIR/figures/*.png``, built from results.json.

The results dict follows the schema in DESIGN.md ("results.json"); every section except ``tasks`` may be
absent, and any metric value may be null (pixel metrics of tasks without masks). Metrics are printed as
percentages with one decimal, nulls as "–".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moleflow.evaluation.protocol import METRIC_NAMES
from moleflow.visualize import (
    atomic_write,
    draw_mask_contour,
    new_figure,
    overlay_heatmap,
    save_figure,
)

__all__ = ["METRICS", "TaskExamples", "format_summary_table", "pct", "text_table", "write_report"]

METRICS = METRIC_NAMES
METRIC_TITLES = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "pixel_ap": "Pixel AP",
    "aupro": "AUPRO",
    "image_ap": "Image AP",
    "image_f1_max": "Image F1-max",
    "pixel_f1_max": "Pixel F1-max",
    "pro_at_threshold": "PRO at threshold",
}
# Column heads of the plain-text summary: the first four always, the others when results carry them.
SUMMARY_COLUMNS = (
    ("image_auroc", "img AUROC"),
    ("pixel_auroc", "pix AUROC"),
    ("pixel_ap", "pix AP"),
    ("aupro", "AUPRO"),
    ("image_ap", "img AP"),
    ("image_f1_max", "img F1"),
    ("pixel_f1_max", "pix F1"),
    ("pro_at_threshold", "PRO@thr"),
)
OPERATING_POINT_TITLES = {
    "image_f1_threshold": "Image F1-max threshold",
    "pixel_f1_threshold": "Pixel F1-max threshold",
    "pro_threshold": "PRO threshold",
}
NULL = "–"


@dataclass
class TaskExamples:
    """Example predictions of one task, for the report's figures.

    ``images``: uint8 ``(S, S, 3)``; ``maps``: float anomaly maps ``(S, S)``; ``masks``: ground truth
    ``(S, S)`` or None; ``labels``: 0 normal / 1 anomalous, one per example. ``scores`` / ``all_labels``:
    the routed image scores ``(N,)`` and 0/1 labels ``(N,)`` of all the task's test images after the
    last task. ``threshold``: the image-score decision threshold, drawn on the histogram when given.
    """

    task: str
    images: list[np.ndarray]
    maps: list[np.ndarray]
    masks: list[np.ndarray | None]
    labels: list[int]
    scores: np.ndarray
    all_labels: np.ndarray
    threshold: float | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if not (len(self.maps) == len(self.masks) == len(self.labels) == n):
            raise ValueError(
                f"task {self.task!r}: images, maps, masks and labels must have one entry per example, got "
                f"{n}, {len(self.maps)}, {len(self.masks)}, {len(self.labels)}"
            )
        if np.shape(self.scores) != np.shape(self.all_labels):
            raise ValueError(
                f"task {self.task!r}: scores {np.shape(self.scores)} and all_labels "
                f"{np.shape(self.all_labels)} differ in shape"
            )


# ---------------------------------------------------------------- formatting helpers


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(float(x))


def pct(x: Any) -> str:
    """A metric in [0, 1] as a percentage with one decimal (0.9123 -> "91.2"); null / NaN -> "–"."""
    return f"{100.0 * float(x):.1f}" if _is_number(x) else NULL


def _num(x: Any, fmt: str = "{:.1f}") -> str:
    return fmt.format(float(x)) if _is_number(x) else NULL


def _count(x: Any) -> str:
    return f"{int(x):,}" if _is_number(x) else NULL


def _at(values: Any, i: int) -> Any:
    return values[i] if isinstance(values, Sequence) and i < len(values) else None


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _metric_names(*sections: dict | None) -> list[str]:
    """The known metrics first in their usual order, then any other keys (results may gain metrics)."""
    present = [k for s in sections if s for k in s]
    return [m for m in METRICS if m in present] + sorted({k for k in present if k not in METRICS})


def _title(metric: str) -> str:
    return METRIC_TITLES.get(metric, metric)


# ---------------------------------------------------------------- markdown sections


def _summary_section(results: dict) -> list[str]:
    tasks, routed, oracle = results["tasks"], results.get("metrics") or {}, results.get("metrics_oracle")
    names = _metric_names(routed, oracle)
    columns = [(routed, m, _title(m)) for m in names if m in routed]
    if oracle:
        columns += [(oracle, m, f"{_title(m)} (oracle)") for m in names if m in oracle]
    rows = [[t] + [pct(_at((sec[m] or {}).get("final"), j)) for sec, m, _ in columns] for j, t in enumerate(tasks)]
    rows.append(["**mean**"] + [pct((sec[m] or {}).get("final_mean")) for sec, m, _ in columns])
    note = "After the last task; routed: the router picks each test image's task"
    note += "; oracle: the true task is given." if oracle else "."
    lines = ["## Final metrics (%)", "", note, ""]
    return lines + _md_table(["Task"] + [c[2] for c in columns], rows)


def _matrix_section(section: dict | None, tasks: list[str], label: str) -> list[str]:
    matrix = (section or {}).get("matrix")
    if not matrix:
        return []
    rows = [
        [f"after {tasks[i] if i < len(tasks) else i}"] + [pct(_at(row, j)) for j in range(len(tasks))]
        for i, row in enumerate(matrix)
    ]
    lines = [
        f"## Accuracy matrix: image AUROC, {label} (%)",
        "",
        "Row i: after training task i; column j: evaluated on task j.",
        "",
    ]
    return lines + _md_table(["", *tasks], rows)


def _forgetting_section(results: dict) -> list[str]:
    routed, oracle = results.get("metrics") or {}, results.get("metrics_oracle")
    names = _metric_names(routed, oracle)
    if not names:
        return []
    header = ["Metric", "Routed"] + (["Oracle"] if oracle else [])
    rows = [
        [_title(m), pct((routed.get(m) or {}).get("forgetting"))]
        + ([pct((oracle.get(m) or {}).get("forgetting"))] if oracle else [])
        for m in names
    ]
    lines = [
        "## Forgetting (percentage points)",
        "",
        "Mean over earlier tasks of (best value before the last task - final value); positive = worse.",
        "",
    ]
    return lines + _md_table(header, rows)


def _routing_section(results: dict, figure: str | None) -> list[str]:
    routing = results.get("routing")
    if not routing:
        return []
    tasks = results["tasks"]
    lines = ["## Routing", "", f"Routing accuracy: **{pct(routing.get('accuracy'))}%**", ""]
    confusion = routing.get("confusion")
    if confusion:
        lines += ["Confusion (rows: true task, columns: routed to):", ""]
        rows = [[tasks[i] if i < len(tasks) else str(i)] + [_num(v, "{:g}") for v in row] for i, row in enumerate(confusion)]
        lines += _md_table(["true \\ routed", *tasks[: len(confusion[0])]], rows)
    if figure:
        lines += [f"![routing confusion]({figure})", ""]
    return lines


def _calibration_section(results: dict) -> list[str]:
    """Per product: how its thresholds were set, and what they gave on its test set."""
    calibration = results.get("calibration")
    if not calibration:
        return []
    rows = []
    for task in results["tasks"]:
        cal = calibration.get(task) or {}
        test = cal.get("test") or {}
        rows.append(
            [
                task,
                f"{cal.get('method', NULL)} ({_count(cal.get('images'))} images)",
                "manual" if cal.get("image_fpr") is None else f"{100 * cal['image_fpr']:g}",
                _num(cal.get("image_threshold"), "{:.4g}"),
                pct(test.get("recall")),
                pct(test.get("false_alarm_rate")),
                pct(test.get("unknown_rate")),
            ]
        )
    header = ["Task", "Calibrated on", "Target FPR %", "Threshold", "Recall %", "False alarms %", "Unknown %"]
    intro = [
        "## Calibration",
        "",
        "Each product's image threshold is set on normal images it did not train on, to a target false-alarm rate;",
        "recall, false alarms and images rejected as an unknown product are what it gives on the product's test set.",
        "",
    ]
    return intro + _md_table(header, rows)


def _operating_points_section(results: dict) -> list[str]:
    points = results.get("operating_points")
    if not points:
        return []
    names = list(OPERATING_POINT_TITLES) + sorted({k for p in points.values() for k in p} - set(OPERATING_POINT_TITLES))
    names = [n for n in names if any(n in p for p in points.values())]
    rows = [[t] + [_num((points.get(t) or {}).get(n), "{:.4g}") for n in names] for t in results["tasks"]]
    lines = [
        "## Operating points",
        "",
        "Score thresholds (routed, after the last task): where F1 peaks, and where PRO was taken.",
        "",
    ]
    return lines + _md_table(["Task"] + [OPERATING_POINT_TITLES.get(n, n) for n in names], rows)


def _timing_section(results: dict) -> list[str]:
    timing = results.get("timing")
    if not timing:
        return []
    rows = [
        [t, _num(_at(timing.get("feature_seconds"), j)), _num(_at(timing.get("train_seconds"), j))]
        for j, t in enumerate(results["tasks"])
    ]
    lines = ["## Timing", ""] + _md_table(["Task", "Features (s)", "Training (s)"], rows)
    return lines + [f"Inference: {_num(timing.get('inference_ms_per_image'), '{:.2f}')} ms per image", ""]


def _params_section(results: dict) -> list[str]:
    params = results.get("params")
    if not params:
        return []
    lines = [
        "## Parameters",
        "",
        f"- Backbone (frozen): {_count(params.get('backbone'))}",
        f"- Shared base: {_count(params.get('base'))}",
        "",
    ]
    per_task = params.get("per_task") or []
    rows = [[t, _count(_at(per_task, j))] for j, t in enumerate(results["tasks"])]
    return lines + _md_table(["Task", "Task-specific parameters"], rows)


# ---------------------------------------------------------------- figures


def _confusion_figure(results: dict, path: Path) -> bool:
    confusion = (results.get("routing") or {}).get("confusion")
    if not confusion:
        return False
    counts = np.asarray(confusion, dtype=np.float64)
    tasks = results["tasks"]
    n = counts.shape[0]
    fig = new_figure(1.2 + 0.55 * n, 1.0 + 0.5 * n)
    ax = fig.add_subplot()
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)  # colour: row fraction
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), value in np.ndenumerate(counts):
        ax.text(
            j,
            i,
            f"{value:g}",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if share[i, j] > 0.5 else "black",
        )
    labels = [tasks[i] if i < len(tasks) else str(i) for i in range(max(counts.shape))]
    ax.set_xticks(range(counts.shape[1]), labels[: counts.shape[1]], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels[:n], fontsize=7)
    ax.set_xlabel("routed to", fontsize=8)
    ax.set_ylabel("true task", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    save_figure(fig, path)
    return True


def _map_range(maps: list[np.ndarray]) -> tuple[float, float]:
    """Shared colour range of a task's maps: 1st to 99th percentile, so one hot pixel cannot wash it out."""
    values = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [1.0, 99.0])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _examples_figure(ex: TaskExamples, path: Path) -> bool:
    if not ex.images:
        return False
    vmin, vmax = _map_range(ex.maps)
    cols = 3 if any(m is not None for m in ex.masks) else 2
    fig = new_figure(2.0 * cols, 2.0 * len(ex.images) + 0.4)
    axes = fig.subplots(len(ex.images), cols, squeeze=False)
    rows = zip(ex.images, ex.maps, ex.masks, ex.labels, strict=True)
    for r, (image, amap, mask, label) in enumerate(rows):
        axes[r, 0].imshow(image)
        axes[r, 0].set_ylabel("anomalous" if label else "normal", fontsize=8)
        axes[r, 1].imshow(overlay_heatmap(image, amap, vmin, vmax))
        if cols == 3:
            if mask is not None:
                draw_mask_contour(axes[r, 2], image, mask)
            else:
                axes[r, 2].text(0.5, 0.5, "no mask", ha="center", va="center", fontsize=8)
    for c, name in enumerate(["image", "anomaly map", "ground truth"][:cols]):
        axes[0, c].set_title(name, fontsize=9)
    for (_, c), ax in np.ndenumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(c == 0)  # the image column keeps its frame so its row label shows
    fig.suptitle(f"{ex.task} (colour range {vmin:.3g} to {vmax:.3g})", fontsize=9)
    save_figure(fig, path)
    return True


def _histogram_figure(ex: TaskExamples, path: Path) -> bool:
    scores = np.asarray(ex.scores, dtype=np.float64).ravel()
    labels = np.asarray(ex.all_labels).ravel()
    keep = np.isfinite(scores)
    scores, labels = scores[keep], labels[keep]
    if scores.size == 0:
        return False
    bins = np.histogram_bin_edges(scores, bins=min(30, max(5, scores.size // 4)))
    fig = new_figure(4.2, 2.8)
    ax = fig.add_subplot()
    for value, name, colour in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red")):
        part = scores[labels == value]
        if part.size:
            ax.hist(part, bins=bins, alpha=0.6, color=colour, label=f"{name} ({part.size})")
    if ex.threshold is not None and _is_number(ex.threshold):
        ax.axvline(float(ex.threshold), color="black", linestyle="--", linewidth=1.0, label="threshold")
    ax.set_xlabel("image score", fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    ax.set_title(f"{ex.task}: image scores (routed)", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


FIGURE_KINDS = ("examples", "scores")


def _examples_section(results: dict, examples: dict[str, TaskExamples], fig_dir: Path) -> list[str]:
    """Figures of every task: drawn anew from ``examples`` where given, else the ones already on disk
    (a product not evaluated by this command keeps its figures); figures of other tasks are deleted."""
    tasks = list(results["tasks"])
    for kind in FIGURE_KINDS:
        for stale in fig_dir.glob(f"{kind}_*.png"):
            if stale.stem[len(kind) + 1 :] not in tasks:
                stale.unlink(missing_ok=True)
    lines = ["## Examples", ""]
    for task in tasks:
        ex = examples.get(task)
        if ex is not None:
            _examples_figure(ex, fig_dir / f"examples_{task}.png")
            _histogram_figure(ex, fig_dir / f"scores_{task}.png")
        shown = [k for k in FIGURE_KINDS if (fig_dir / f"{k}_{task}.png").is_file()]
        if shown:
            lines += [f"### {task}", ""]
            lines += [f"![{task} {kind}](figures/{kind}_{task}.png)" for kind in shown] + [""]
    return lines if len(lines) > 2 else []


# ---------------------------------------------------------------- public API


def write_report(run_dir: Path, results: dict, examples: dict[str, TaskExamples]) -> Path:
    """Write ``run_dir/report.md`` and its figures under ``run_dir/figures``; return the report's path."""
    run_dir = Path(run_dir)
    if "tasks" not in results:
        raise ValueError("results has no 'tasks' list; expected the results.json schema of DESIGN.md")
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    tasks = list(results["tasks"])
    confusion_fig = (
        "figures/routing_confusion.png" if _confusion_figure(results, fig_dir / "routing_confusion.png") else None
    )
    lines = [
        f"# MoLE-Flow run report: {run_dir.name}",
        "",
        f"Tasks, in training order: {', '.join(tasks)}",
        "",
    ]
    env = results.get("environment")
    if env:
        lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines += _summary_section(results)
    lines += _matrix_section((results.get("metrics") or {}).get("image_auroc"), tasks, "routed")
    lines += _matrix_section((results.get("metrics_oracle") or {}).get("image_auroc"), tasks, "oracle")
    lines += _operating_points_section(results)
    lines += _forgetting_section(results)
    lines += _routing_section(results, confusion_fig)
    lines += _calibration_section(results)
    lines += _timing_section(results)
    lines += _params_section(results)
    lines += _examples_section(results, examples, fig_dir)
    text = "\n".join(lines).rstrip() + "\n"
    path = run_dir / "report.md"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def format_summary_table(results: dict) -> str:
    """Fixed-width plain-text table of final per-task metrics (%), a mean row and the routing accuracy.

    The four metrics of the first release are always columns; image AP, F1-max and PRO at the threshold
    join them when the results carry them (older results.json files have only the four).
    """
    routed, oracle = results.get("metrics") or {}, results.get("metrics_oracle") or {}
    columns = [(routed, m, head) for k, (m, head) in enumerate(SUMMARY_COLUMNS) if k < 4 or m in routed]
    columns.append((oracle, "image_auroc", "oracle img"))
    tasks = list(results["tasks"])
    rows = [[t] + [pct(_at((sec.get(m) or {}).get("final"), j)) for sec, m, _ in columns] for j, t in enumerate(tasks)]
    rows.append(["mean"] + [pct((sec.get(m) or {}).get("final_mean")) for sec, m, _ in columns])
    header = ["task"] + [head for _, _, head in columns]
    lines = text_table(header, rows, rule_before_last=True).splitlines()
    accuracy = (results.get("routing") or {}).get("accuracy")
    lines.append(f"routing accuracy: {pct(accuracy)}{'%' if _is_number(accuracy) else ''}")
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], rule_before_last: bool = False) -> str:
    """Fixed-width plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [str(c).rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([str(row[0]).ljust(widths[0]), *cells]).rstrip()

    rule = "-" * len(fmt(header))
    body = [fmt(r) for r in rows]
    if rule_before_last and body:
        body.insert(len(body) - 1, rule)
    return "\n".join([fmt(header), rule, *body])
