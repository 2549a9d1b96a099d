"""Component ablations and the frozen-base x component factorial (outline 3.3).

Every component is a pair of config overrides (:data:`COMPONENTS`): ``off`` switches it off, ``on``
switches it on where a preset leaves it off (the offline preset has no scale context and an MLP subnet).
An analysis composes runs from these overrides only; nothing is threaded through the model.

- ``moleflow analyze interaction``: for each component, a 2 (base frozen after task 0 / always trainable)
  x 2 (component on / off) design over N seeds, and a two-way ANOVA per component. The full model
  (every selected component on) is the "on" cell of every component, so the two full-model cells
  (frozen, unfrozen) are run once per seed and shared: ``2 + 2 C`` runs per seed for ``C`` components.
  The interaction p-values are Bonferroni-corrected over the components (analysis/stats.py).
- ``moleflow analyze ablation``: one factor at a time with the base frozen: the full model vs. each
  component off, mean ± std over seeds and the paired (same-seed) difference.

The compared number is the primary metric of analysis/runs.py (pixel AP where masks exist, image AUROC
otherwise; mean over the final row of the oracle matrix by default, which isolates the flow from routing;
``--matrix routed`` includes routing, needed for ``router_metric``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moleflow.analysis.runs import (
    PRIMARY_NAME,
    Runner,
    RunSetup,
    RunSummary,
    add_run_arguments,
    percent,
    setup_from_args,
    write_outputs,
)
from moleflow.analysis.stats import interaction_table, mean_std, two_way_anova
from moleflow.config import MoleFlowConfig, apply_overrides, to_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Component:
    """A switchable part of the method: the overrides that turn it off, and on (empty: on by default)."""

    name: str
    description: str
    off: tuple[str, ...]
    on: tuple[str, ...] = ()


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("whitening", "whitening adapter (3.3.1)", ("model.whitening=null",)),
        Component("tail_loss", "tail-aware loss (3.5); off = plain mean NLL", ("loss.tail_weight=0",)),
        Component("dia", "deep invertible adapter (3.4.3)", ("model.dia=null",)),
        Component(
            "scale_context",
            "scale context (3.3.3); needs a CNN backbone",
            ("model.scale_context=null",),
            ("model.scale_context.kernel_size=3",),
        ),
        Component("spatial_mixer", "spatial context mixer (3.3.2)", ("model.spatial_mixer=null",)),
        Component(
            "context_subnet",
            "context-aware coupling subnet; off = MLP subnet",
            ("model.flow.subnet=mlp",),
            ("model.flow.subnet=context",),
        ),
        Component(
            "lora_rank",
            "LoRA rank of the preset; off = rank 4 with alpha/rank = 1 (the offline and paper scale)",
            ("model.flow.lora.rank=4", "model.flow.lora.alpha=4.0"),
        ),
        Component(
            "router_metric",
            "Mahalanobis router; off = Euclidean (only the routed matrix sees it; a pooled covariance goes with it)",
            ("router.metric=euclidean", "router.covariance=own"),
            ("router.metric=mahalanobis",),
        ),
    )
}
DEFAULT_COMPONENTS = ("whitening", "tail_loss", "dia", "spatial_mixer")
_EFFECT_NAMES = {"A": "frozen", "B": "component", "A:B": "interaction"}  # two_way_anova's factors here
BASE_POLICY = {True: "train.base_policy=frozen_after_first", False: "train.base_policy=always_trainable"}


def resolve_components(names: Sequence[str]) -> list[Component]:
    """Registry lookup; unknown or repeated names raise with the list of known ones."""
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; known: {', '.join(COMPONENTS)}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"give each component once (at least one), got {list(names)}")
    return [COMPONENTS[n] for n in names]


@dataclass(frozen=True)
class Cell:
    """One configuration of the design: base frozen or not, and which component is off (None: full model)."""

    frozen: bool
    off: str | None = None

    @property
    def label(self) -> str:
        return f"{'frozen' if self.frozen else 'unfrozen'}/{'full' if self.off is None else self.off + ' off'}"

    def overrides(self, components: Sequence[Component]) -> tuple[str, ...]:
        """Base policy, every selected component's ``on``, then the ``off`` of the switched-off one."""
        switched = [o for c in components for o in c.on]
        off = next((c.off for c in components if c.name == self.off), ()) if self.off else ()
        return (BASE_POLICY[self.frozen], *switched, *off)


def check_switchable(cfg: MoleFlowConfig, components: Sequence[Component]) -> None:
    """Raise if switching a component off leaves the full model's config unchanged (nothing to compare)."""
    full = to_dict(apply_overrides(cfg, Cell(True).overrides(components)))
    for c in components:
        if to_dict(apply_overrides(cfg, Cell(True, c.name).overrides(components))) == full:
            raise ValueError(f"component {c.name!r}: its off overrides {list(c.off)} change nothing in this config")


def factorial_cells(components: Sequence[Component]) -> list[Cell]:
    """The two shared full-model cells, then frozen/unfrozen with each component off: ``2 + 2 C`` cells."""
    return [Cell(True), Cell(False)] + [Cell(frozen, c.name) for c in components for frozen in (True, False)]


def ablation_cells(components: Sequence[Component]) -> list[Cell]:
    """The frozen full model, then the frozen model with each component off: ``1 + C`` cells."""
    return [Cell(True)] + [Cell(True, c.name) for c in components]


def run_cells(
    runner: Runner, cells: Sequence[Cell], components: Sequence[Component], seeds: Sequence[int]
) -> dict[tuple[Cell, int], RunSummary]:
    """Every cell once per seed (seed-major, so a stopped run has whole seeds)."""
    out = {}
    total = len(cells) * len(seeds)
    for seed in seeds:
        for cell in cells:
            log.info("[%d/%d] seed %d, %s", len(out) + 1, total, seed, cell.label)
            out[(cell, seed)] = runner.run(cell.overrides(components), seed)
    return out


def _value(summary: RunSummary, matrix: str) -> float:
    value = summary.primary[matrix]
    if value is None:
        raise ValueError(f"run {summary.key} has no {matrix} metric value; its tasks have no usable test labels")
    return value


def cell_values(runs: Mapping[tuple[Cell, int], RunSummary], cell: Cell, seeds: Sequence[int], matrix: str) -> list[float]:
    return [_value(runs[(cell, s)], matrix) for s in seeds]


def interaction_rows(
    runs: Mapping[tuple[Cell, int], RunSummary], components: Sequence[Component], seeds: Sequence[int], matrix: str
) -> list[dict]:
    """Per component: interaction F, p, Bonferroni p, partial eta², both main effects, the 4 cell means."""
    designs, extra = {}, {}
    for c in components:
        cells = {(fz, on): Cell(fz, None if on else c.name) for fz in (True, False) for on in (True, False)}
        values, frozen, on = [], [], []
        for (fz, is_on), cell in cells.items():
            vals = cell_values(runs, cell, seeds, matrix)
            values += vals
            frozen += [fz] * len(vals)
            on += [is_on] * len(vals)
        designs[c.name] = (values, frozen, on)
        anova = two_way_anova(values, frozen, on)
        y, fz_mask = np.asarray(values), np.asarray(frozen)
        extra[c.name] = {
            "frozen_effect": float(y[fz_mask].mean() - y[~fz_mask].mean()),
            "anova": {_EFFECT_NAMES[k]: vars(v) for k, v in anova.effects.items()},
            "cells": {
                f"{'frozen' if fz else 'unfrozen'}_{'on' if is_on else 'off'}": _cell_stats(
                    cell_values(runs, cell, seeds, matrix)
                )
                for (fz, is_on), cell in cells.items()
            },
        }
    rows = interaction_table(designs)
    return [
        {
            "component": r.component,
            "description": COMPONENTS[r.component].description,
            "component_effect": r.main_effect,
            "f": r.f,
            "p": r.p_raw,
            "p_bonferroni": r.p_bonferroni,
            "partial_eta_sq": r.partial_eta_sq,
            "category": r.category,
            **extra[r.component],
        }
        for r in rows
    ]


def _cell_stats(values: Sequence[float]) -> dict:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "values": list(values)}


def ablation_rows(
    runs: Mapping[tuple[Cell, int], RunSummary], components: Sequence[Component], seeds: Sequence[int], matrix: str
) -> list[dict]:
    """Per component: full and component-off mean ± std, and the paired difference off - full."""
    full = cell_values(runs, Cell(True), seeds, matrix)
    rows = []
    for c in components:
        off = cell_values(runs, Cell(True, c.name), seeds, matrix)
        forgetting = [runs[(Cell(True, c.name), s)].primary_forgetting[matrix] for s in seeds]
        rows.append(
            {
                "component": c.name,
                "description": c.description,
                "full": _cell_stats(full),
                "off": _cell_stats(off),
                "delta": _cell_stats([o - f for o, f in zip(off, full, strict=True)]),
                "off_forgetting": forgetting,
            }
        )
    return rows


# ----------------------------------------------------------------------------- outputs


def _pm(stats: Mapping[str, float]) -> str:
    return f"{percent(stats['mean'])} ± {percent(stats['std'])}"


def interaction_markdown(rows: Sequence[dict], setup: dict) -> str:
    lines = [
        f"Metric: {PRIMARY_NAME}, mean over tasks of the final row of the {setup['matrix']} matrix, in %; "
        f"seeds {setup['seeds']}; tasks {', '.join(setup['task_names'])}.",
        "",
        "| component | frozen on | frozen off | unfrozen on | unfrozen off | effect on−off (points) "
        "| frozen−unfrozen (points) | interaction F | p | p (Bonferroni) | partial η² | category |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = r["cells"]
        lines.append(
            f"| {r['component']} | {_pm(cells['frozen_on'])} | {_pm(cells['frozen_off'])} | {_pm(cells['unfrozen_on'])} "
            f"| {_pm(cells['unfrozen_off'])} | {percent(r['component_effect'], 2)} | {percent(r['frozen_effect'], 2)} "
            f"| {r['f']:.2f} | {r['p']:.3g} | {r['p_bonferroni']:.3g} | {r['partial_eta_sq']:.2f} | {r['category']} |"
        )
    return "\n".join(lines) + "\n"


def ablation_markdown(rows: Sequence[dict], setup: dict) -> str:
    lines = [
        f"Metric: {PRIMARY_NAME}, final row of the {setup['matrix']} matrix, in % (mean ± std over seeds "
        f"{setup['seeds']}); base frozen after task 0; tasks {', '.join(setup['task_names'])}.",
        "",
        "| component switched off | full model | without it | difference (paired) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['component']} | {_pm(r['full'])} | {_pm(r['off'])} | {_pm(r['delta'])} |")
    return "\n".join(lines) + "\n"


def plot_interaction(rows: Sequence[dict], path: Path, matrix: str) -> Path:
    """One panel per component: cell means (± std) for frozen/unfrozen, one line for on, one for off."""
    from moleflow.visualize import new_figure, save_figure

    fig = new_figure(3.0 * len(rows), 3.2)
    axes = fig.subplots(1, len(rows), squeeze=False, sharey=True)[0]
    for ax, r in zip(axes, rows, strict=True):
        for state, style in (("on", "o-"), ("off", "s--")):
            stats = [r["cells"][f"{base}_{state}"] for base in ("frozen", "unfrozen")]
            means = [100 * s["mean"] for s in stats]
            stds = [100 * np.nan_to_num(s["std"]) for s in stats]
            ax.errorbar([0, 1], means, yerr=stds, fmt=style, capsize=3, label=f"{r['component']} {state}")
        ax.set_xticks([0, 1], ["frozen", "unfrozen"])
        ax.set_xlim(-0.35, 1.35)  # keep neighbouring panels' tick labels apart
        ax.set_title(f"{r['component']}\nF={r['f']:.2f}, p_bonf={r['p_bonferroni']:.2g}", fontsize=8)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"primary metric (%), {matrix}")
    return save_figure(fig, path)


def plot_ablation(rows: Sequence[dict], path: Path, matrix: str) -> Path:
    """Bars of the paired difference (component off - full model) with ± std over seeds."""
    from moleflow.visualize import new_figure, save_figure

    fig = new_figure(1.0 + 1.1 * len(rows), 3.2)
    ax = fig.subplots()
    means = [100 * r["delta"]["mean"] for r in rows]
    stds = [100 * np.nan_to_num(r["delta"]["std"]) for r in rows]
    ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color=["tab:red" if m < 0 else "tab:green" for m in means])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r["component"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel(f"off − full (points), {matrix}")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- commands


def _setup(args) -> tuple[RunSetup, list[Component]]:
    setup = setup_from_args(args)
    components = resolve_components([n.strip() for n in args.components.split(",") if n.strip()])
    check_switchable(setup.runner.base_cfg, components)
    if setup.matrix == "oracle" and any(c.name == "router_metric" for c in components):
        log.warning("router_metric only changes routing; the oracle matrix cannot see it (use --matrix routed)")
    return setup, components


def _runs_json(runs: Mapping[tuple[Cell, int], RunSummary]) -> list[dict]:
    return [{"cell": cell.label, "frozen": cell.frozen, "off": cell.off, **s.to_json()} for (cell, _), s in runs.items()]


def cmd_interaction(args) -> int:
    setup, components = _setup(args)
    runs = run_cells(setup.runner, factorial_cells(components), components, setup.seeds)
    rows = interaction_rows(runs, components, setup.seeds, setup.matrix)
    data = {"analysis": "interaction", "setup": setup.description, "components": rows, "runs": _runs_json(runs)}
    json_path, md_path = write_outputs(
        args.out, args.json, "interaction", data, interaction_markdown(rows, setup.description)
    )
    png = plot_interaction(rows, args.out / "interaction.png", setup.matrix)
    log.info("wrote %s, %s, %s (%d runs trained)", json_path, md_path, png, len(setup.runner.executed))
    return 0


def cmd_ablation(args) -> int:
    setup, components = _setup(args)
    runs = run_cells(setup.runner, ablation_cells(components), components, setup.seeds)
    rows = ablation_rows(runs, components, setup.seeds, setup.matrix)
    data = {"analysis": "ablation", "setup": setup.description, "components": rows, "runs": _runs_json(runs)}
    json_path, md_path = write_outputs(args.out, args.json, "ablation", data, ablation_markdown(rows, setup.description))
    png = plot_ablation(rows, args.out / "ablation.png", setup.matrix)
    log.info("wrote %s, %s, %s (%d runs trained)", json_path, md_path, png, len(setup.runner.executed))
    return 0


def register(subparsers) -> None:
    known = ", ".join(COMPONENTS)
    for name, func, text in (
        ("interaction", cmd_interaction, "2x2 factorial (frozen/unfrozen base x component on/off) with ANOVA"),
        ("ablation", cmd_ablation, "one-factor-at-a-time ablation of the frozen-base model"),
    ):
        p = subparsers.add_parser(name, help=text, description=f"{text}. Components: {known}.")
        add_run_arguments(p)
        p.add_argument("--components", default=",".join(DEFAULT_COMPONENTS), help=f"comma-separated, from: {known}")
        p.set_defaults(func=func)
