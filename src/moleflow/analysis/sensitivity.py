"""Task-order and Task-0 sensitivity (outline, "태스크 순서 분석").

The first task trains the shared base flow that every later task reuses frozen, so the choice of Task 0
may matter. ``moleflow analyze order`` runs the same tasks in several orders (by default each task once
as Task 0: the K rotations of the given order), each over N seeds, and reports per order the mean ± std
over seeds of the final average metric and of forgetting, for the routed and the oracle matrix; per task
the metric it ends with when it was Task 0 vs. when it came later; and the spread between orders.

The metric is the primary metric of analysis/runs.py (pixel AP where masks exist, image AUROC otherwise).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from moleflow.analysis.runs import (
    MATRICES,
    PRIMARY_NAME,
    Runner,
    RunSummary,
    add_run_arguments,
    percent,
    setup_from_args,
    write_outputs,
)
from moleflow.analysis.stats import mean_std

log = logging.getLogger(__name__)
Order = tuple[str, ...]


def rotations(names: Sequence[str]) -> list[Order]:
    """``[a, b, c]`` -> ``[(a, b, c), (b, c, a), (c, a, b)]``: every task is Task 0 exactly once."""
    return [tuple(names[i:]) + tuple(names[:i]) for i in range(len(names))]


def generate_orders(names: Sequence[str], n_orders: int, seed: int = 0) -> list[Order]:
    """``n_orders`` distinct orders: the rotations first (each task as Task 0), then random permutations
    (drawn with ``seed``) until there are enough; at most ``len(names)!`` orders exist."""
    names = tuple(names)
    total = len(list(itertools.permutations(names))) if len(names) <= 8 else None
    if n_orders < 1 or (total is not None and n_orders > total):
        raise ValueError(f"--n-orders must lie in [1, {total}] for {len(names)} tasks, got {n_orders}")
    orders = rotations(names)[:n_orders]
    rng = random.Random(seed)
    while len(orders) < n_orders:
        candidate = tuple(rng.sample(names, len(names)))
        if candidate not in orders:
            orders.append(candidate)
    return orders


def parse_orders(text: str, names: Sequence[str]) -> list[Order]:
    """``"a,b,c;c,b,a"`` -> orders of task names; each must be a permutation of ``names``, no repeats."""
    orders = []
    for chunk in text.split(";"):
        order = tuple(n.strip() for n in chunk.split(",") if n.strip())
        if sorted(order) != sorted(names):
            raise ValueError(f"order {list(order)} is not a permutation of the task names {list(names)}")
        if order in orders:
            raise ValueError(f"order {list(order)} is given twice")
        orders.append(order)
    return orders


def run_orders(runner: Runner, orders: Sequence[Order], seeds: Sequence[int]) -> dict[tuple[Order, int], RunSummary]:
    out = {}
    total = len(orders) * len(seeds)
    for seed in seeds:
        for order in orders:
            log.info("[%d/%d] seed %d, order %s", len(out) + 1, total, seed, " > ".join(order))
            out[(order, seed)] = runner.run((), seed, order)
    return out


def _stats(values: Sequence[float | None]) -> dict:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "values": list(values)}
    mean, std = mean_std(present)
    return {"mean": mean, "std": std, "values": list(values)}


def order_rows(runs: Mapping[tuple[Order, int], RunSummary], orders: Sequence[Order], seeds: Sequence[int]) -> list[dict]:
    """Per order and matrix: final mean metric and forgetting, mean ± std over seeds."""
    rows = []
    for order in orders:
        row: dict = {"order": list(order), "task0": order[0]}
        for m in MATRICES:
            row[m] = {
                "final": _stats([runs[(order, s)].primary[m] for s in seeds]),
                "forgetting": _stats([runs[(order, s)].primary_forgetting[m] for s in seeds]),
            }
        row["routing_accuracy"] = _stats([runs[(order, s)].routing_accuracy for s in seeds])
        rows.append(row)
    return rows


def task0_rows(runs: Mapping[tuple[Order, int], RunSummary], names: Sequence[str], matrix: str) -> list[dict]:
    """Per task: its final metric (over all runs) when it was Task 0 vs. when it came later."""
    rows = []
    for name in names:
        first, later = [], []
        for (order, _), summary in runs.items():
            value = summary.primary_final[matrix][order.index(name)]
            if value is not None:
                (first if order[0] == name else later).append(value)
        rows.append({"task": name, "as_task0": _stats(first), "later": _stats(later)})
    return rows


def spread(rows: Sequence[dict], matrix: str) -> dict:
    """Between orders: max - min and std of the per-order mean final metric."""
    means = np.array([r[matrix]["final"]["mean"] for r in rows if r[matrix]["final"]["mean"] is not None])
    if means.size == 0:
        return {"range": None, "std": None}
    return {"range": float(means.max() - means.min()), "std": float(means.std(ddof=1)) if means.size > 1 else None}


# ----------------------------------------------------------------------------- outputs


def _pm(stats: Mapping) -> str:
    return f"{percent(stats['mean'])} ± {percent(stats['std'])}"


def order_markdown(rows: Sequence[dict], task0: Sequence[dict], spreads: dict, setup: dict) -> str:
    lines = [
        f"Metric: {PRIMARY_NAME}, mean over the final row, in % (mean ± std over seeds {setup['seeds']}). "
        "Forgetting: average drop from a task's best earlier value to its final value, in points.",
        "",
        "| order (Task 0 first) | routed final | oracle final | routed forgetting | oracle forgetting | routing acc. |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {' > '.join(r['order'])} | {_pm(r['routed']['final'])} | {_pm(r['oracle']['final'])} "
            f"| {_pm(r['routed']['forgetting'])} | {_pm(r['oracle']['forgetting'])} | {_pm(r['routing_accuracy'])} |"
        )
    lines += [
        "",
        "Spread between orders (max − min of the order means): "
        + ", ".join(f"{m} {percent(spreads[m]['range'])} points" for m in MATRICES),
        "",
        f"Per task, its final {setup['matrix']} metric when it was Task 0 vs. when it came later (all seeds):",
        "",
        "| task | as Task 0 | later |",
        "|---|---|---|",
    ]
    lines += [f"| {r['task']} | {_pm(r['as_task0'])} | {_pm(r['later'])} |" for r in task0]
    return "\n".join(lines) + "\n"


def plot_orders(rows: Sequence[dict], path: Path) -> Path:
    """Two panels: final metric and forgetting per order, routed and oracle bars with ± std."""
    from moleflow.visualize import new_figure, save_figure

    fig = new_figure(2.0 + 1.4 * len(rows), 3.4)
    axes = fig.subplots(1, 2)
    x, width = np.arange(len(rows)), 0.38
    labels = [" > ".join(t[:8] for t in r["order"]) for r in rows]
    for ax, key, title in ((axes[0], "final", "final mean metric (%)"), (axes[1], "forgetting", "forgetting (points)")):
        for k, m in enumerate(MATRICES):
            means = [100 * (r[m][key]["mean"] or 0.0) for r in rows]
            stds = [100 * np.nan_to_num(r[m][key]["std"] if r[m][key]["std"] is not None else 0.0) for r in rows]
            ax.bar(x + (k - 0.5) * width, means, width, yerr=stds, capsize=3, label=m)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- command


def cmd_order(args) -> int:
    setup = setup_from_args(args)
    names = setup.runner.task_names
    if args.orders and args.n_orders:
        raise ValueError("give either --orders or --n-orders, not both")
    orders = parse_orders(args.orders, names) if args.orders else generate_orders(names, args.n_orders or len(names))
    runs = run_orders(setup.runner, orders, setup.seeds)
    rows = order_rows(runs, orders, setup.seeds)
    task0 = task0_rows(runs, names, setup.matrix)
    spreads = {m: spread(rows, m) for m in MATRICES}
    data = {
        "analysis": "order",
        "setup": setup.description,
        "orders": rows,
        "task0": task0,
        "spread": spreads,
        "runs": [{"order": list(o), **s.to_json()} for (o, _), s in runs.items()],
    }
    markdown = order_markdown(rows, task0, spreads, setup.description)
    json_path, md_path = write_outputs(args.out, args.json, "order", data, markdown)
    png = plot_orders(rows, args.out / "order.png")
    log.info("wrote %s, %s, %s (%d runs trained)", json_path, md_path, png, len(setup.runner.executed))
    return 0


def register(subparsers) -> None:
    text = "task-order and Task-0 sensitivity: the same tasks in several orders, over seeds"
    p = subparsers.add_parser("order", help=text, description=text)
    add_run_arguments(p)
    p.add_argument("--orders", help="explicit orders of task names: 'a,b,c;c,b,a' (names as in the run)")
    p.add_argument("--n-orders", type=int, help="number of orders: rotations first, then random (default: #tasks)")
    p.set_defaults(func=cmd_order)
