"""Routing confusion of a finished run (outline 3.6): which task's images the router sends where.

Reads ``results["routing"]["confusion"]`` (``T x T`` counts, rows = true task, columns = routed task,
over the test images of every task after the last one was learned) and writes it as a table and a
heatmap, with per-task recall and the most frequent confusions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from moleflow.analysis.outputs import markdown_table, write_analysis
from moleflow.visualize import new_figure, save_figure

log = logging.getLogger(__name__)


def read_results(run: Path) -> dict[str, Any]:
    """``run`` is a run directory (with ``results.json``) or a results file."""
    from moleflow.rundir import RunDirectory

    if Path(run).is_dir():
        results = RunDirectory(run).read_results()
        if results is None:
            raise FileNotFoundError(
                f"{Path(run) / 'results.json'} does not exist: give a run directory written by `moleflow train`"
            )
        return results
    path = Path(run)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a run directory written by `moleflow train`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e


def routing_summary(tasks: list[str], confusion: Any) -> dict[str, Any]:
    """Accuracy, per-task recall, row-normalised matrix and off-diagonal confusions from ``confusion (T, T)``."""
    c = np.asarray(confusion, dtype=np.int64)
    if c.ndim != 2 or c.shape != (len(tasks), len(tasks)):
        raise ValueError(f"routing confusion has shape {c.shape}, expected ({len(tasks)}, {len(tasks)}) for tasks {tasks}")
    if (c < 0).any():
        raise ValueError("routing confusion holds negative counts")
    per_row = c.sum(axis=1)
    rates = np.divide(c, per_row[:, None], out=np.zeros(c.shape), where=per_row[:, None] > 0)
    total = int(c.sum())
    mistakes = [
        {"true": tasks[i], "routed": tasks[j], "images": int(c[i, j]), "share_of_true": float(rates[i, j])}
        for i in range(len(tasks))
        for j in range(len(tasks))
        if i != j and c[i, j] > 0
    ]
    return {
        "tasks": tasks,
        "confusion": c.tolist(),
        "row_normalised": rates.tolist(),
        "images": total,
        "accuracy": float(np.trace(c) / total) if total else None,
        "recall": {t: (float(rates[i, i]) if per_row[i] else None) for i, t in enumerate(tasks)},
        "confusions": sorted(mistakes, key=lambda m: -m["images"]),
    }


def routing_markdown(summary: dict[str, Any]) -> str:
    tasks = summary["tasks"]
    head = ["true \\ routed", *tasks, "recall"]
    rows = [
        [t, *summary["confusion"][i], summary["recall"][t] if summary["recall"][t] is None else 100 * summary["recall"][t]]
        for i, t in enumerate(tasks)
    ]
    acc = summary["accuracy"]
    lines = [
        "# Routing confusion (rows: true task, columns: routed task; counts of test images)",
        f"Accuracy {100 * acc:.1f} % over {summary['images']} images." if acc is not None else "No images.",
        markdown_table(head, rows, 1),
    ]
    if summary["confusions"]:
        lines.append(
            markdown_table(
                ["true task", "routed to", "images", "% of true task"],
                [[m["true"], m["routed"], m["images"], 100 * m["share_of_true"]] for m in summary["confusions"]],
                1,
            )
        )
    return "\n\n".join(lines) + "\n"


def routing_figure(summary: dict[str, Any], path: Path) -> Path:
    tasks, rates, counts = summary["tasks"], np.asarray(summary["row_normalised"]), summary["confusion"]
    size = 1.2 + 0.9 * len(tasks)
    fig = new_figure(size + 1.2, size)
    ax = fig.subplots()
    im = ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            colour = "white" if rates[i, j] > 0.6 else "black"
            ax.text(j, i, f"{counts[i][j]}\n{100 * rates[i, j]:.0f}%", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    ax.set_xlabel("routed task")
    ax.set_ylabel("true task")
    acc = summary["accuracy"]
    ax.set_title(f"routing accuracy {100 * acc:.1f} %" if acc is not None else "routing", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true task's images")
    return save_figure(fig, path)


def run_routing_analysis(run: Path, out: Path) -> dict[str, Any]:
    results = read_results(run)
    routing = results.get("routing")
    if not isinstance(routing, dict) or "confusion" not in routing or "tasks" not in results:
        raise ValueError(f"{run}: results.json has no routing section (written by moleflow >= 0.1 `train`/`eval`)")
    if not np.asarray(routing["confusion"]).sum():  # e.g. learned with --eval none: a table of zeros says nothing
        hint = f"run `moleflow eval {run}`"
        raise ValueError(f"{run}: no test image has been evaluated yet (learned with --eval none?); {hint}")
    summary = routing_summary(list(results["tasks"]), routing["confusion"])
    summary["run"] = str(Path(run).resolve())
    write_analysis(
        out, "routing", summary, routing_markdown(summary), lambda p: routing_figure(summary, p), "routing_confusion.png"
    )
    return summary
